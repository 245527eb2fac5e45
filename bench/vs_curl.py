"""dcpfetch against curl fetching the same bytes from the same server, side by side in one run:
wall time, CPU and peak RSS of whole processes, A B A B, medians and ratios.

    python3 bench/vs_curl.py CKPT_DIR [--server nginx|s3like|garage ...] [--sink stream|dir ...]
        [--runs 5] [--dcpfetch target/release/dcpfetch] [--dcpfetch-args '--concurrency 8']
    python3 bench/vs_curl.py CKPT_DIR --server garage --memory-sweep

CKPT_DIR is a checkpoint on disk; if it does not exist it is written with
`bench/make_http_bench_checkpoint.py CKPT_DIR --layers L --dim D` (model + Adam state, no torch
needed; `--layers 3 --dim 1024` is ~430 MiB, the default).

Servers (`--server`, repeatable; default nginx and s3like), all on loopback:
- nginx: plain HTTP, the Debian package, one process, access log off, sendfile on. curl asks for
  the same ranges over HTTP.
- s3like: the project's S3 test server (`cargo build --release --locked --example s3-test-server`)
  with S3's shape: 30 ms before every answer's headers and 90 MB/s per connection. curl signs with
  `--aws-sigv4`, path-style.
- garage: Garage (crates.io `garage`, a production S3 store; `--garage BIN`, default `garage` on
  PATH), started single-node in a temp folder, with a key, a bucket and the checkpoint uploaded by
  curl PUTs. curl signs as Garage needs (region `garage`, UNSIGNED-PAYLOAD).

For each selection (one layer `model.layers.0.*`, the model only `model.*`, everything) and sink,
A = dcpfetch and B = curl on the same bytes: the range groups of dcpfetch's own plan (same gap
rule), one curl process per shard file, all files in parallel, each fetching its file's groups one
after another over one connection (`-r a-b URL --next ...`); for everything each file whole.
Sinks (`--sink`, repeatable; default both): `stream` = `dcpfetch -o - > /dev/null` against curl to
/dev/null; `dir` = `dcpfetch -o DIR` (a fresh folder every run) against curl writing each group
to its own file in a fresh folder. After one warm-up pair, A and B alternate `--runs` times. The
table gives median wall times, the median of the pairwise ratios curl_time / dcpfetch_time (speed
relative to curl, 1.0 = as fast), CPU seconds (curl: all its processes), and peak RSS (dcpfetch:
the process; curl: the largest of its processes, and their sum).

For the stream sink a third command, C = "curl in order", runs after A and B in every round: one
curl process fetching every group of the plan in plan order over one connection, the same ordered
bytes `-o -` writes, made the way curl can make them (parallel curls write four outputs, not one
stream in order). Its columns are its median time and the median of C_time / dcpfetch_time.

`--memory-sweep`: only everything, `-o -` with `--max-memory` 16 MiB to 1 GiB and `-o DIR` at the
default, peak RSS against the budget (median of `--runs`).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SELECTIONS = [("one layer", "model.layers.0.*"), ("model only", "model.*"), ("everything", None)]
MIB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(proc, port, what, log=None):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited: {open(log).read() if log else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"{what} did not start")


def measure(cmds, stdout=subprocess.DEVNULL):
    """Runs the commands at once; returns (wall s, CPU s of all, max RSS MiB, sum RSS MiB)."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=stdout, stderr=subprocess.PIPE) for c in cmds]
    cpu, rss = 0.0, []
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{os.path.basename(p.args[0])} failed: {' '.join(p.args)}\n{err[-2000:]}")
        cpu += ru.ru_utime + ru.ru_stime
        rss.append(ru.ru_maxrss / 1024)
    return time.perf_counter() - t, cpu, max(rss), sum(rss)


class Nginx:
    label = "nginx (HTTP, loopback)"

    def __init__(self, ckpt, tmp):
        root, self.name = os.path.split(ckpt)
        port = free_port()
        conf = f"""master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(
            ["nginx", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf"), "-e", os.path.join(tmp, "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.proc, port, "nginx", os.path.join(tmp, "error.log"))
        self.url = f"http://127.0.0.1:{port}/{self.name}"
        self.env = dict(os.environ)

    def dcpfetch_args(self):
        return [self.url]

    def file_url(self, f):
        return f"{self.url}/{f}"

    def curl(self):
        return ["curl", "-sS", "--fail"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class S3Server:
    """What an S3 endpoint needs for dcpfetch and curl; subclasses start the server."""

    region = "us-east-1"
    key, secret = "bench", "benchsecret"

    def dcpfetch_args(self):
        return [f"s3://{self.bucket}/{self.name}", "--endpoint-url", self.endpoint, "--region", self.region]

    def file_url(self, f):
        return f"{self.endpoint}/{self.bucket}/{self.name}/{f}"

    def curl(self):
        return ["curl", "-sS", "--fail", "--aws-sigv4", f"aws:amz:{self.region}:s3", "--user",
                f"{self.key}:{self.secret}", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]

    def client_env(self):
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret, AWS_REGION=self.region)
        for k in ["AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"]:
            env.pop(k, None)
        return env

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class S3Like(S3Server):
    label = "s3like (project S3 server, 30 ms first byte, 90 MB/s per connection)"

    def __init__(self, ckpt, tmp, binary):
        parent, self.name = os.path.split(ckpt)
        self.bucket = "bench"
        root = os.path.join(tmp, "root")
        os.makedirs(root)
        os.symlink(parent, os.path.join(root, self.bucket))
        self.proc = subprocess.Popen(
            [binary, "--root", root, "--latency-ms", "30", "--conn-bandwidth", "90MB"],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            sys.exit(f"s3-test-server did not start: {line!r}")
        self.endpoint = line.split()[-1]
        if not self.endpoint.startswith("http"):
            self.endpoint = "http://" + self.endpoint
        self.env = self.client_env()


class Garage(S3Server):
    label = "Garage (production S3 store, loopback)"
    region = "garage"

    def __init__(self, ckpt, tmp, binary):
        _, self.name = os.path.split(ckpt)
        self.bucket = "bench"
        self.binary = binary
        port, rpc, admin = free_port(), free_port(), free_port()
        conf = os.path.join(tmp, "garage.toml")
        with open(conf, "w") as f:
            f.write(f"""metadata_dir = "{tmp}/meta"
data_dir = "{tmp}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{os.urandom(32).hex()}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
""")
        self.conf = conf
        log = open(os.path.join(tmp, "garage.log"), "w")
        self.proc = subprocess.Popen([binary, "-c", conf, "server"], stdout=log, stderr=log)
        wait_port(self.proc, port, "garage", os.path.join(tmp, "garage.log"))
        node = self.garage("node", "id", "-q").strip().split("@")[0]
        self.garage("layout", "assign", "-z", "dc1", "-c", "10G", node)
        self.garage("layout", "apply", "--version", "1")
        out = self.garage("key", "create", "bench")
        self.key = next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Key ID" in l)
        self.secret = next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Secret key" in l)
        self.garage("bucket", "create", self.bucket)
        self.garage("bucket", "allow", "--read", "--write", "--owner", self.bucket, "--key", "bench")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = self.client_env()
        for f in sorted(os.listdir(ckpt)):
            subprocess.run([*self.curl(), "-T", os.path.join(ckpt, f), self.file_url(f), "-o", "/dev/null"],
                           check=True)

    def garage(self, *args):
        for _ in range(50):
            p = subprocess.run([self.binary, "-c", self.conf, *args], capture_output=True, text=True)
            if p.returncode == 0:
                return p.stdout
            time.sleep(0.2)
        sys.exit(f"garage {' '.join(args)} failed: {p.stderr}")


def plan_of(dcpfetch, server, select):
    args = [dcpfetch, "plan", *server.dcpfetch_args(), "--json", "--groups"]
    if select:
        args += ["-s", select]
    return json.loads(subprocess.run(args, check=True, capture_output=True, env=server.env).stdout)


def curl_commands(server, plan, out_dir):
    """One curl argv per shard file, fetching the range groups of dcpfetch's plan (to /dev/null,
    or each group to its own file in out_dir)."""
    cmds = []
    for f in plan["files"]:
        url = server.file_url(f["file"])
        cmd = server.curl()
        groups = f["range_groups"]
        for i, g in enumerate(groups):
            if i:
                cmd.append("--next")
                cmd += server.curl()[1:]
            dest = os.path.join(out_dir, f"{f['file']}.{i}") if out_dir else "/dev/null"
            if not (len(groups) == 1 and g["start"] == 0 and g["end"] == f["size"]):
                cmd += ["-r", f"{g['start']}-{g['end'] - 1}"]
            cmd += [url, "-o", dest]
        cmds.append(cmd)
    return cmds


def curl_in_order(server, plan):
    """One curl argv fetching every range group of dcpfetch's plan in plan order (files in order,
    groups by offset) over one connection: the ordered stream `dcpfetch -o -` writes, made the way
    curl can make it (curl's parallel mode does not keep the order of one output). The per-file
    commands of `curl_commands`, joined with `--next`."""
    cmd = []
    for c in curl_commands(server, plan, None):
        cmd += ["--next", *c[1:]] if cmd else c
    return cmd


def dcpfetch_command(dcpfetch, server, select, output, extra):
    args = [dcpfetch, "fetch", *server.dcpfetch_args(), "-o", output, "-q", *extra]
    if select:
        args += ["-s", select]
    return args


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def compare(a, server, tmp):
    out_a, out_b = os.path.join(tmp, "out-dcpfetch"), os.path.join(tmp, "out-curl")
    print(f"\n### {server.label}, {a.runs} pairs\n")
    print("| selection | sink | MB needed | dcpfetch s | curl s | speed vs curl | curl in order s "
          "| speed vs curl in order | dcpfetch CPU s | curl CPU s | dcpfetch peak RSS MiB "
          "| curl peak RSS MiB (max / sum) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, select in SELECTIONS:
        plan = plan_of(a.dcpfetch, server, select)
        mb = plan["totals"]["bytes_needed"] / 1e6
        for sink in a.sink:
            def run_a():
                if sink == "stream":
                    return measure([dcpfetch_command(a.dcpfetch, server, select, "-", a.extra)])
                shutil.rmtree(out_a, ignore_errors=True)
                return measure([dcpfetch_command(a.dcpfetch, server, select, out_a, a.extra)])

            def run_b():
                return measure(curl_commands(server, plan, fresh(out_b) if sink == "dir" else None))

            def run_c():
                return measure([curl_in_order(server, plan)]) if sink == "stream" else None

            os.environ.update(server.env)
            run_a(), run_b(), run_c()
            rows = []
            for _ in range(a.runs):
                rows.append((run_a(), run_b(), run_c()))
            med = lambda xs: statistics.median(xs)
            da, db = med([r[0][0] for r in rows]), med([r[1][0] for r in rows])
            ratio = med([r[1][0] / r[0][0] for r in rows])
            in_order = "| |"
            if sink == "stream":
                dc = med([r[2][0] for r in rows])
                in_order = f"| {dc:.3f} | {med([r[2][0] / r[0][0] for r in rows]):.2f} |"
            print(f"| {label} | {sink} | {mb:.0f} | {da:.3f} | {db:.3f} | {ratio:.2f} {in_order} "
                  f"{med([r[0][1] for r in rows]):.2f} | {med([r[1][1] for r in rows]):.2f} | "
                  f"{med([r[0][2] for r in rows]):.0f} | {med([r[1][2] for r in rows]):.0f} / "
                  f"{med([r[1][3] for r in rows]):.0f} |", flush=True)


def sweep(a, server, tmp):
    out = os.path.join(tmp, "out-dcpfetch")
    os.environ.update(server.env)
    print(f"\n### Peak RSS against --max-memory, everything, {server.label}, median of {a.runs}\n")
    print("| output | --max-memory | peak RSS MiB | RSS - budget MiB | wall s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for budget in ["16MiB", "64MiB", "256MiB", "1GiB"]:
        part = ["--part-size", "8MiB" if budget != "16MiB" else "4MiB"]
        runs = [measure([dcpfetch_command(a.dcpfetch, server, None, "-", [*a.extra, "--max-memory", budget, *part])])
                for _ in range(a.runs)]
        rss = statistics.median(r[2] for r in runs)
        mib = {"16MiB": 16, "64MiB": 64, "256MiB": 256, "1GiB": 1024}[budget]
        print(f"| -o - | {budget} | {rss:.0f} | {rss - mib:+.0f} | {statistics.median(r[0] for r in runs):.2f} |",
              flush=True)
    runs = []
    for _ in range(a.runs):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure([dcpfetch_command(a.dcpfetch, server, None, out, a.extra)]))
    print(f"| -o DIR | 256MiB (default) | {statistics.median(r[2] for r in runs):.0f} | | "
          f"{statistics.median(r[0] for r in runs):.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--server", action="append", choices=["nginx", "s3like", "garage"])
    ap.add_argument("--sink", action="append", choices=["stream", "dir"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dcpfetch", default=os.path.join(REPO, "target", "release", "dcpfetch"))
    ap.add_argument("--s3-server", default=os.path.join(REPO, "target", "release", "examples", "s3-test-server"))
    ap.add_argument("--garage", default=shutil.which("garage") or "garage")
    ap.add_argument("--dcpfetch-args", default="", help="more arguments for dcpfetch fetch, one string")
    ap.add_argument("--memory-sweep", action="store_true")
    a = ap.parse_args()
    a.extra = a.dcpfetch_args.split()
    a.server = a.server or ["nginx", "s3like"]
    a.sink = a.sink or ["stream", "dir"]
    if shutil.which("curl") is None:
        sys.exit("curl is needed")
    ckpt = os.path.abspath(a.ckpt)
    if not os.path.isdir(ckpt):
        subprocess.run([sys.executable, os.path.join(HERE, "make_http_bench_checkpoint.py"), ckpt,
                        "--layers", str(a.layers), "--dim", str(a.dim)], check=True)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    print(f"checkpoint {os.path.basename(ckpt)}: {size / 1e6:.0f} MB in {len(os.listdir(ckpt)) - 1} shard files"
          + (f"; dcpfetch fetch ... {a.dcpfetch_args}" if a.extra else ""))
    for name in a.server:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "nginx":
                server = Nginx(ckpt, tmp)
            elif name == "s3like":
                server = S3Like(ckpt, tmp, a.s3_server)
            else:
                server = Garage(ckpt, tmp, a.garage)
            try:
                (sweep if a.memory_sweep else compare)(a, server, tmp)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
