"""dcpfetch over HTTP against curl fetching the same bytes from the same nginx on loopback.

    python3 bench/http_vs_curl.py CKPT_DIR [--runs 5] [--dcpfetch target/release/dcpfetch]
        [--dcpfetch-args '--concurrency 4']

CKPT_DIR is a checkpoint on disk; if it does not exist it is written with
`bench/make_http_bench_checkpoint.py CKPT_DIR --layers 3 --dim 1024` (model + Adam state, ~430 MiB,
no torch needed). nginx (Debian package) is started on a
free loopback port serving the checkpoint's folder, as one process, access log off, sendfile on.

Three selections: one layer (`model.layers.0.*`), the model only (`model.*`) and everything. For
each, A = `dcpfetch fetch http://... -o - -q -s SEL > /dev/null` and B = curl fetching the same
bytes: the range groups dcpfetch's own plan reads (same gap rule), one curl process per shard file,
all files in parallel, each curl fetching its file's groups one after another over one connection
(`-r a-b URL --next ...`); for everything, each file whole. A and B run in turn, A B A B, after one
warm-up pair; the report gives each median wall time, MB/s of bytes needed, and the median of the
pairwise ratios curl_time / dcpfetch_time (speed relative to curl: 1.0 = as fast as curl).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root, tmp):
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
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
    with open(os.path.join(tmp, "nginx.conf"), "w") as f:
        f.write(conf)
    proc = subprocess.Popen(
        ["nginx", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf"), "-e", os.path.join(tmp, "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"nginx exited: {open(os.path.join(tmp, 'error.log')).read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("nginx did not start")


def curl_commands(dcpfetch, url, select):
    """One curl argv per shard file, fetching the range groups of dcpfetch's plan."""
    args = [dcpfetch, "plan", url, "--json", "--groups"]
    if select:
        args += ["-s", select]
    plan = json.loads(subprocess.run(args, check=True, capture_output=True).stdout)
    cmds = []
    for f in plan["files"]:
        file_url = f"{url}/{f['file']}"
        cmd = ["curl", "-sS", "--fail"]
        groups = f["range_groups"]
        if len(groups) == 1 and groups[0]["start"] == 0 and groups[0]["end"] == f["size"]:
            cmd += [file_url, "-o", "/dev/null"]
        else:
            for i, g in enumerate(groups):
                if i:
                    cmd.append("--next")
                cmd += ["-r", f"{g['start']}-{g['end'] - 1}", file_url, "-o", "/dev/null"]
        cmds.append(cmd)
    return cmds, plan["totals"]


def time_dcpfetch(dcpfetch, url, select, extra=()):
    args = [dcpfetch, "fetch", url, "-o", "-", "-q", *extra]
    if select:
        args += ["-s", select]
    t = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def time_curl(cmds):
    t = time.monotonic()
    procs = [subprocess.Popen(c) for c in cmds]
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"curl failed: {p.args}")
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dcpfetch", default=os.path.join(REPO, "target", "release", "dcpfetch"))
    ap.add_argument("--dcpfetch-args", default="", help="more arguments for dcpfetch fetch, one string")
    a = ap.parse_args()
    extra = a.dcpfetch_args.split()
    for tool in ["nginx", "curl"]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install -y {tool})")
    ckpt = os.path.abspath(a.ckpt)
    if not os.path.isdir(ckpt):
        subprocess.run(
            [sys.executable, os.path.join(HERE, "make_http_bench_checkpoint.py"), ckpt, "--layers", "3", "--dim", "1024"],
            check=True,
        )
    root, name = os.path.split(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_nginx(root, tmp)
        try:
            url = f"http://127.0.0.1:{port}/{name}"
            if extra:
                print(f"dcpfetch fetch ... {' '.join(extra)}")
            print(f"checkpoint {name}: {sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) / 1e6:.0f} MB, sink /dev/null, loopback nginx, {a.runs} pairs")
            print(f"{'selection':<20} {'needed MB':>10} {'requests':>9} {'dcpfetch s':>11} {'curl s':>8} {'dcpfetch MB/s':>14} {'curl MB/s':>10} {'speed vs curl':>14}")
            for label, select in [("one layer", "model.layers.0.*"), ("model only", "model.*"), ("everything", None)]:
                cmds, totals = curl_commands(a.dcpfetch, url, select)
                time_dcpfetch(a.dcpfetch, url, select, extra)
                time_curl(cmds)
                ours, theirs, ratios = [], [], []
                for _ in range(a.runs):
                    d = time_dcpfetch(a.dcpfetch, url, select, extra)
                    c = time_curl(cmds)
                    ours.append(d)
                    theirs.append(c)
                    ratios.append(c / d)
                mb = totals["bytes_needed"] / 1e6
                d, c = statistics.median(ours), statistics.median(theirs)
                print(
                    f"{label:<20} {mb:>10.1f} {totals['requests']:>9} {d:>11.3f} {c:>8.3f} {mb / d:>14.0f} {mb / c:>10.0f} {statistics.median(ratios):>14.2f}"
                )
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
