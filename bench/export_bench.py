"""`dcpfetch export` of a model without its optimizer state, side by side in one run with the two
ways people do it in Python today: wall time and peak RSS of whole processes, medians and ratios.

    cargo build --release --locked && cargo build --release --locked --example s3-test-server
    pip install s3torchconnector safetensors      # in the Python that runs this script (torch 2.x)
    python3 bench/export_bench.py --dcpfetch target/release/dcpfetch --root /tmp/export-bench

The checkpoint is ROOT/BUCKET/PREFIX (default ROOT/ckpt/train1g), served as s3://BUCKET/PREFIX by
the project's S3 test server (tests/support/s3_test_server_main.rs) on loopback. If it does not
exist it is written by `bench/make_training_checkpoint.py --layers 21` (model + Adam state: a
1008 MiB model, 3 GiB in all; `--layers` changes the size, 1 layer = 48 MiB of model).

Link profiles (`--profile`, repeatable, default both): `loopback` (no shaping) and `s3like` (30 ms
first-byte latency on every request and 90 MB/s per connection, the server's knobs, as in
bench/side_by_side.py). Each measurement of A and B starts a fresh server. Every process is fresh;
the selection is `--select` (default `model.*`):

- A, export + load: `dcpfetch export s3://BUCKET/PREFIX --select SEL --endpoint-url URL --path-style
  -o OUT/model.safetensors --quiet`, then a `python3` that imports torch and safetensors and calls
  `safetensors.torch.load_file` on the file (and reads one byte of every page of every tensor, so
  that the data is in memory even if the loader maps the file lazily). Wall time: both processes,
  from the start of the export to the end of the load. Peak RSS: each process's own.
- B, s3torchconnector: a `python3` that imports torch and s3torchconnector, makes `torch.empty`
  full-size tensors of the selected keys (dtype and shape from `dcpfetch ls --json`) and runs
  `dcp.load(sd, storage_reader=S3StorageReader(region, "s3://BUCKET/PREFIX",
  s3client_config=S3ClientConfig(force_path_style=True),
  reader_constructor=S3ReaderConstructor.dcp_optimized()))` (default 32 MiB gap) against the
  same server (AWS_ENDPOINT_URL). The same keys end up in torch as in A.
- P, export streamed into the loader: `dcpfetch export ... -o - --quiet | python3 -c ...`, whose
  Python reads stdin on a thread while it imports torch, then `safetensors.torch.load`s the bytes:
  the same tensors in torch as A, with the fetch and the import overlapping and no file written.
  Peak RSS: the larger of the two processes.
- C, torch conversion: what `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` does
  (`_load_state_dict` with `_EmptyStateDictLoadPlanner` from `FileSystemReader` on the local folder,
  no network), then the model keys (fqns starting with the selection's prefix) go to
  `safetensors.torch.save_file(OUT/model.safetensors)`: the usual conversion script, minus the
  torch.save file in between. Its peak RSS is the reference of the memory goal. It does not use the
  server, so it is measured with the first profile only.

Wall times are whole processes (Python start and imports included); B's and the loader's own
timers (load only) are shown as well, and a second time ratio without Python start and imports.
After `--warmup` unrecorded rounds, the clients alternate A B C, A B C ... `--runs` times. torch
processes run with OMP_NUM_THREADS=1 (`--torch-threads`), as in bench/side_by_side.py. Before timing, one export is checked with
tests/interop/check_export.py against the local folder, and C's file against A's (same keys,
same bytes).

Goals (issue 12): A at least 3x faster than B (B median / A median >= 3), and the export's peak
RSS at most 0.2x C's (the conversion step; the loaded tensors themselves are the user's).
`--json FILE` keeps every measurement.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 1 << 20
ELEMENT_SIZE = {"float64": 8, "int64": 8, "complex64": 8, "complex128": 16, "float32": 4, "int32": 4, "uint32": 4,
                "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1}

ENV = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
           AWS_EC2_METADATA_DISABLED="true")
for _k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    ENV.pop(_k, None)

# A's second process: the user's load of the exported file.
PY_LOAD = r"""
import json, resource, sys, time
t_proc = time.perf_counter()
import torch
from safetensors.torch import load_file
t0 = time.perf_counter()
tensors = load_file(sys.argv[1])
# One byte of every 4 KiB page, so that lazily mapped data is read too.
touched = 0
for t in tensors.values():
    b = t.reshape(-1).view(torch.uint8) if t.numel() else None
    if b is not None:
        touched += int(b[::4096].sum())
print(json.dumps({"load_seconds": time.perf_counter() - t0, "import_seconds": t0 - t_proc,
                  "tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# P's loader: the safetensors stream on stdin, read by a thread while torch imports (so the fetch
# and the import overlap), then `safetensors.torch.load` of the bytes.
PY_LOAD_STDIN = r"""
import json, resource, sys, threading, time
t_proc = time.perf_counter()
chunks = []
def drain():
    while True:
        b = sys.stdin.buffer.read1(1 << 20)
        if not b:
            return
        chunks.append(b)
reader = threading.Thread(target=drain)
reader.start()
import torch
from safetensors.torch import load
t0 = time.perf_counter()
reader.join()
tensors = load(b"".join(chunks))
del chunks
print(json.dumps({"load_seconds": time.perf_counter() - t0, "import_seconds": t0 - t_proc,
                  "tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# B: s3torchconnector's DCP reader, into full-size tensors.
PY_S3TORCH = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
t_proc = time.perf_counter()
import torch
import torch.distributed.checkpoint as dcp
from s3torchconnector import S3ClientConfig, S3ReaderConstructor
from s3torchconnector.dcp import S3StorageReader

spec = json.load(open(sys.argv[1]))
sd = {e["fqn"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"])) for e in spec["entries"]}
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
reader = S3StorageReader(spec["region"], spec["location"], s3client_config=S3ClientConfig(force_path_style=True),
                         reader_constructor=S3ReaderConstructor.dcp_optimized())
dcp.load(sd, storage_reader=reader)
out = {"load_seconds": time.perf_counter() - t0, "import_seconds": t0 - t_proc, "keys": len(sd),
       "rss_before_load_mib": rss_before, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if spec.get("compare_with"):  # the pre-check: the same bytes as the export
    from safetensors.torch import load_file
    ref = load_file(spec["compare_with"])
    out["mismatched"] = [k for k, t in sd.items()
                         if k not in ref or ref[k].dtype != t.dtype or ref[k].shape != t.shape
                         or not torch.equal(ref[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))]
print(json.dumps(out))
"""

# C: dcp_to_torch_save's load of everything, then save_file of the model keys.
PY_TORCH_CONVERT = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
t_proc = time.perf_counter()
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from safetensors.torch import save_file

ckpt, prefix, out = sys.argv[1:4]
t0 = time.perf_counter()
sd = {}
_load_state_dict(sd, storage_reader=FileSystemReader(ckpt), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
t_load = time.perf_counter() - t0

def flat(d, path=""):
    for k, v in d.items():
        key = f"{path}{k}"
        if isinstance(v, dict):
            yield from flat(v, key + ".")
        else:
            yield key, v

model = {k: v.contiguous() for k, v in flat(sd) if k.startswith(prefix) and isinstance(v, torch.Tensor)}
save_file(model, out)
print(json.dumps({"load_seconds": t_load, "convert_seconds": time.perf_counter() - t0, "import_seconds": t0 - t_proc,
                  "tensors": len(model), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# The pre-check of C's file against A's.
PY_SAME_FILES = r"""
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
       or not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]
assert not bad, bad[:5]
print(f"{len(a)} tensors equal")
"""

PROFILES = {  # the test server's flags
    "loopback": [],
    "s3like": ["--latency-ms", "30", "--conn-bandwidth", "90MB"],
}

CLIENTS = {
    "A": "dcpfetch export + load_file",
    "B": "s3torchconnector dcp.load",
    "C": "torch dcp_to_torch_save + save_file",
    "P": "dcpfetch export -o - | python (safetensors.torch.load)",
}


def shlex_quote(text):
    """One argument for `sh -c`."""
    return "'" + text.replace("'", "'\\''") + "'"


def shell(cmd):
    """A command as one line a person can paste (the Python scripts are shown by name)."""
    out = []
    for c in cmd:
        if "\n" in c:
            out.append("<script>")
        elif any(ch in c for ch in " *'\"$"):
            out.append("'" + c.replace("'", "'\\''") + "'")
        else:
            out.append(c)
    return " ".join(out)


def run(cmd, env, stdout=subprocess.DEVNULL):
    """Runs one process; returns (wall s, CPU s, peak RSS MiB, stdout text or None)."""
    out_file = tempfile.TemporaryFile() if stdout is subprocess.PIPE else None
    err_file = tempfile.TemporaryFile()
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out_file or stdout, stderr=err_file, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    text = None
    if out_file:
        out_file.seek(0)
        text = out_file.read().decode(errors="replace")
        out_file.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{shell(cmd)[:200]} failed (exit {code}): {err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, text


class Server:
    """A fresh s3-test-server serving ROOT; stop() returns its request summary line."""

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
        return next((ln.strip() for ln in (rest or "").splitlines() if ln.startswith("served ")), None)


def version_of(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "not found"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcpfetch", default=os.path.join(REPO, "target", "release", "dcpfetch"))
    ap.add_argument("--server", default=os.path.join(REPO, "target", "release", "examples", "s3-test-server"))
    ap.add_argument("--root", required=True, help="folder whose sub-folders are buckets")
    ap.add_argument("--bucket", default="ckpt")
    ap.add_argument("--prefix", default="train1g", help="the checkpoint's prefix in the bucket")
    ap.add_argument("--layers", type=int, default=21, help="layers of the checkpoint if it must be written")
    ap.add_argument("--select", default="model.*", help="the selection glob (a prefix followed by *)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--clients", default="ABC", help="which of A, B, C, P to run (default A, B, C)")
    ap.add_argument("--profile", action="append", choices=list(PROFILES), help="link profile (repeatable; default all)")
    ap.add_argument("--export-args", default="", help="more arguments for dcpfetch export, one string")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch, safetensors, s3torchconnector")
    ap.add_argument("--torch-threads", type=int, default=1, metavar="N", help="OMP_NUM_THREADS of torch processes")
    ap.add_argument("--out", default=None, help="folder for the output files (default: a temp folder)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks before timing")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args()

    clients = [c for c in a.clients if c in CLIENTS]
    for path in [a.server] + ([a.dcpfetch] if "A" in clients else []):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} not found: cargo build --release --locked && "
                     "cargo build --release --locked --example s3-test-server")
    if not a.select.endswith("*"):
        sys.exit("--select must be a prefix followed by * (C keeps the fqns that start with the prefix)")
    prefix_keys = a.select[:-1]
    local = os.path.join(a.root, a.bucket, a.prefix)
    location = f"s3://{a.bucket}/{a.prefix}"
    if not os.path.isdir(local):
        cmd = [a.python, os.path.join(HERE, "make_training_checkpoint.py"), local, "--layers", str(a.layers)]
        print(f"$ {shell(cmd)}")
        subprocess.run(cmd, check=True, env=dict(ENV, OMP_NUM_THREADS="1"))
    out_root = a.out or tempfile.mkdtemp(prefix="dcpfetch-export-bench-")
    os.makedirs(out_root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dcpfetch-export-bench-cfg-")
    torch_env = dict(ENV, OMP_NUM_THREADS=str(a.torch_threads)) if a.torch_threads else ENV
    profiles = a.profile or list(PROFILES)
    extra = a.export_args.split()

    # The selected entries, as dcpfetch sees them (B loads exactly these keys).
    ls_tool = a.dcpfetch if os.access(a.dcpfetch, os.X_OK) else None
    if ls_tool:
        listing = json.loads(subprocess.run([ls_tool, "ls", local, "--json", "--select", a.select], check=True,
                                            capture_output=True, env=ENV).stdout)
        entries = [{"fqn": e["fqn"], "dtype": e["dtype"], "shape": e["shape"]}
                   for e in listing["entries"] if e["kind"] == "tensor"]
    else:
        sys.exit(f"{a.dcpfetch} is needed to list the selection")
    needed = 0
    for e in entries:
        n = 1
        for s in e["shape"]:
            n *= s
        needed += n * ELEMENT_SIZE[e["dtype"]]
    total = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local))
    spec_file = os.path.join(work, "spec.json")
    with open(spec_file, "w") as f:
        json.dump({"region": a.region, "location": location, "entries": entries}, f)

    out_file = os.path.join(out_root, "model.safetensors")

    def commands(client, endpoint):
        """[(argv, env, label)] run one after another for one measurement."""
        s3 = ["--endpoint-url", endpoint, "--path-style"] if endpoint else []
        if client == "A":
            export = [a.dcpfetch, "export", location, "--select", a.select, *s3, "-o", out_file, "--quiet", *extra]
            return [(export, ENV, "export"),
                    ([a.python, "-c", PY_LOAD, out_file], torch_env, "load_file")]
        if client == "B":
            return [([a.python, "-c", PY_S3TORCH, spec_file], dict(torch_env, AWS_ENDPOINT_URL=endpoint), "dcp.load")]
        if client == "P":
            export = [a.dcpfetch, "export", location, "--select", a.select, *s3, "-o", "-", "--quiet", *extra]
            pipeline = f"{shell(export)} | {shell([a.python, '-c', 'PY_LOAD_STDIN'])}"
            return [(["sh", "-c", pipeline.replace("PY_LOAD_STDIN", shlex_quote(PY_LOAD_STDIN))],
                     dict(torch_env, **{k: v for k, v in ENV.items() if k.startswith("AWS")}), "export | load")]
        return [([a.python, "-c", PY_TORCH_CONVERT, local, prefix_keys, out_file], torch_env, "convert")]

    def measure(client, profile):
        if os.path.exists(out_file):
            os.unlink(out_file)
        load_before = os.getloadavg()[0]
        server = Server(a.server, a.root, PROFILES[profile]) if client in "ABP" else None
        procs = []
        try:
            t = time.perf_counter()
            for cmd, env, label in commands(client, server.endpoint if server else None):
                wall, cpu, rss, text = run(cmd, env, stdout=subprocess.PIPE)
                report = None
                if text and text.strip().startswith("{"):
                    report = json.loads(text.strip().splitlines()[-1])
                procs.append({"step": label, "wall_seconds": wall, "cpu_seconds": cpu, "peak_rss_mib": rss,
                              "report": report})
            wall = time.perf_counter() - t
        finally:
            served = server.stop() if server else None
        return {"client": client, "profile": profile, "wall_seconds": wall, "load_average_before": load_before,
                "procs": procs, "server": served, "output_bytes": os.path.getsize(out_file) if os.path.exists(out_file) else None}

    print("## Versions\n")
    vers = {"dcpfetch": version_of([a.dcpfetch, "--version"]) if ls_tool else "-",
            "python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()}
    py = ("import importlib.metadata as m, json\n"
          "print(json.dumps({k: m.version(k) for k in ('torch', 'safetensors', 's3torchconnector')}))")
    vers.update(json.loads(subprocess.run([a.python, "-c", py], capture_output=True, text=True, check=True).stdout))
    for k, v in vers.items():
        print(f"- {k}: {v}")
    print(f"\ncheckpoint {location} = {local}: {total / MIB:.0f} MiB in {len(os.listdir(local))} files; "
          f"selection `{a.select}`: {len(entries)} tensors, {needed / MIB:.0f} MiB "
          f"({100 * needed / total:.0f}%); output on {out_root}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"torch processes with OMP_NUM_THREADS={a.torch_threads or '(default)'}\n")
    print("Commands of one round (URL: a fresh server per measurement):\n")
    for c in clients:
        for cmd, _env, _label in commands(c, "URL"):
            env_txt = "AWS_ENDPOINT_URL=URL " if c == "B" else ""
            print(f"- {c}: `{env_txt}{shell(cmd)}`")
    print(f"\n`<script>` bodies: PY_LOAD, PY_S3TORCH, PY_TORCH_CONVERT in {os.path.relpath(__file__, REPO)}\n",
          flush=True)

    record = {"versions": vers, "checkpoint": {"location": location, "bytes": total, "selected_bytes": needed},
              "select": a.select, "profiles": {p: PROFILES[p] for p in profiles}, "checks": [],
              "measurements": [], "tables": {}}
    try:
        if not a.no_check:
            check(a, clients, measure, out_file, out_root, local, spec_file, torch_env, record)
        c_rows = None
        for profile in profiles:
            # C reads the local folder: the server's profile does not matter, it runs in the first one only.
            here = [c for c in clients if c != "C" or c_rows is None]
            results = {c: [] for c in here}
            for rnd in range(a.warmup + a.runs):
                for c in here:
                    try:
                        m = measure(c, profile)
                    except RuntimeError as e:
                        m = {"client": c, "profile": profile, "error": str(e), "wall_seconds": None}
                    m["round"] = rnd - a.warmup
                    record["measurements"].append(m)
                    tag = "warm-up" if rnd < a.warmup else f"run {rnd - a.warmup + 1}"
                    done = f"{m['wall_seconds']:.2f} s" if m["wall_seconds"] is not None else \
                        f"FAILED: {m['error'].strip().splitlines()[-1][:200]}"
                    print(f"  [{profile} / {tag}] {c} {CLIENTS[c]}: {done}", file=sys.stderr, flush=True)
                    if rnd >= a.warmup:
                        results[c].append(m)
            rows = table(a, profile, here, results, needed, record, c_rows)
            if "C" in rows:
                c_rows = rows["C"]
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(record, f, indent=1)
            print(f"raw measurements in {a.json}")
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(out_file):
            os.unlink(out_file)
        if not a.out:
            shutil.rmtree(out_root, ignore_errors=True)


def check(a, clients, measure, out_file, out_root, local, spec_file, torch_env, record):
    """Before timing: the export equals torch's dcp.load; B loads the same bytes; C writes the same file."""
    ref = os.path.join(out_root, "reference.safetensors")
    if "A" in clients:
        measure("A", "loopback")
        cmd = [a.python, os.path.join(REPO, "tests", "interop", "check_export.py"), local, out_file]
        _, _, _, text = run(cmd, torch_env, stdout=subprocess.PIPE)
        line = text.strip().splitlines()[-1]
        print(f"check: `{shell(cmd)}`: {line}")
        record["checks"].append({"check_export": line})
        os.replace(out_file, ref)
    if "B" in clients and os.path.exists(ref):
        with open(spec_file) as f:
            spec = json.load(f)
        check_spec = os.path.join(os.path.dirname(spec_file), "check.json")
        with open(check_spec, "w") as f:
            json.dump(dict(spec, compare_with=ref), f)
        server = Server(a.server, a.root, [])
        try:
            _, _, _, text = run([a.python, "-c", PY_S3TORCH, check_spec],
                                dict(torch_env, AWS_ENDPOINT_URL=server.endpoint), stdout=subprocess.PIPE)
        finally:
            server.stop()
        bad = json.loads(text.strip().splitlines()[-1])["mismatched"]
        print(f"check: s3torchconnector's tensors vs the export: {'equal' if not bad else f'MISMATCH {bad[:5]}'}")
        record["checks"].append({"s3torchconnector_mismatched": bad})
        if bad:
            sys.exit("B loaded different data: the comparison is void")
    if "C" in clients and os.path.exists(ref):
        measure("C", "loopback")
        _, _, _, text = run([a.python, "-c", PY_SAME_FILES, ref, out_file], torch_env, stdout=subprocess.PIPE)
        print(f"check: the torch conversion's file vs the export: {text.strip()}")
        record["checks"].append({"torch_conversion": text.strip()})
    if os.path.exists(ref):
        os.unlink(ref)
    print(flush=True)


def table(a, profile, clients, results, needed, record, c_row):
    med = statistics.median
    ok = {c: [m for m in rs if m["wall_seconds"] is not None] for c, rs in results.items()}
    rows = {}
    flags = " ".join(PROFILES[profile]) or "(none)"
    print(f"\n### Profile `{profile}` (server flags `{flags}`), `{a.select}`, median of {a.runs} run(s)\n")
    print("| client | wall s | MB/s of the selection | own timers s | CPU s | peak RSS MiB | runs s |")
    print("| --- | ---: | ---: | --- | ---: | --- | --- |")
    for c in clients:
        rs = ok[c]
        if not rs:
            err = results[c][0]["error"].strip().splitlines()[-1][:150].replace("|", "/") if results[c] else "not run"
            print(f"| {CLIENTS[c]} | failed: {err} | | | | | |")
            continue
        steps = [p["step"] for p in rs[0]["procs"]]
        step = {s: [next(p for p in m["procs"] if p["step"] == s) for m in rs] for s in steps}
        row = {
            "wall": med(m["wall_seconds"] for m in rs),
            "cpu": med(sum(p["cpu_seconds"] for p in m["procs"]) for m in rs),
            "rss": {s: max(p["peak_rss_mib"] for p in ps) for s, ps in step.items()},
            "step_wall": {s: med(p["wall_seconds"] for p in ps) for s, ps in step.items()},
            "own": {s: med(p["report"]["load_seconds"] for p in ps) for s, ps in step.items() if ps[0]["report"]},
            # the work without Python start and imports: A = the export process + load_file's own timer
            "work": med(sum(p["report"]["load_seconds"] if p["report"] else p["wall_seconds"] for p in m["procs"])
                        for m in rs),
            "runs": [m["wall_seconds"] for m in rs],
        }
        if c == "C":
            row["own"] = {"load": row["own"]["convert"],
                          "load + save": med(p["report"]["convert_seconds"] for p in step["convert"])}
        rows[c] = row
        rss_txt = ", ".join(f"{s} {v:.0f}" for s, v in row["rss"].items())
        own_txt = ", ".join([f"{s} process {v:.2f}" for s, v in row["step_wall"].items() if len(steps) > 1 and
                             s not in row["own"]] + [f"{s} {v:.2f}" for s, v in row["own"].items()])
        runs = ", ".join(f"{w:.2f}" for w in row["runs"])
        print(f"| {CLIENTS[c]} | {row['wall']:.2f} | {needed / row['wall'] / 1e6:.0f} | {own_txt} | {row['cpu']:.2f} | "
              f"{rss_txt} | {runs} |")
    if c_row is not None and "C" not in rows:
        print(f"| {CLIENTS['C']} (local folder, measured with the first profile) | {c_row['wall']:.2f} | | | "
              f"{c_row['cpu']:.2f} | convert {c_row['rss']['convert']:.0f} | |")
    print()
    ratios = {}
    if "A" in rows and "B" in rows:
        pair = med(b["wall_seconds"] / x["wall_seconds"] for x, b in zip(ok["A"], ok["B"]))
        work = rows["B"]["own"]["dcp.load"] / rows["A"]["work"]
        ratios.update(B_over_A_wall=pair, B_over_A_work=work)
        print(f"- time, B / A, whole processes (median of the per-round ratios): {pair:.2f} "
              f"(goal >= 3: {'met' if pair >= 3 else 'not met'})")
        print(f"- time, B / A without Python start and imports (B: its dcp.load; A: the export process + "
              f"load_file's own time, {rows['A']['work']:.2f} s): {work:.2f}")
    if "P" in rows and "B" in rows:
        pair = med(b["wall_seconds"] / x["wall_seconds"] for x, b in zip(ok["P"], ok["B"]))
        ratios.update(B_over_P_wall=pair)
        print(f"- time, B / P (the export streamed into the Python that imports torch meanwhile), whole "
              f"processes: {pair:.2f} (goal >= 3: {'met' if pair >= 3 else 'not met'})")
    c = rows.get("C", c_row)
    if "A" in rows and c is not None:
        r = rows["A"]["rss"]["export"] / c["rss"]["convert"]
        r2 = max(rows["A"]["rss"].values()) / c["rss"]["convert"]
        ratios.update(A_export_rss_over_C=r, A_largest_process_rss_over_C=r2,
                      C_over_A_wall=c["wall"] / rows["A"]["wall"])
        print(f"- peak RSS, the dcpfetch export process / the torch conversion: {r:.3f} "
              f"(goal <= 0.2: {'met' if r <= 0.2 else 'not met'})")
        print(f"- peak RSS, A's largest process (load_file with every page touched) / the torch conversion: {r2:.3f}")
        print(f"- time, C / A, whole processes: {c['wall'] / rows['A']['wall']:.2f}")
    record["tables"][profile] = {"rows": rows, "ratios": ratios}
    return rows


if __name__ == "__main__":
    main()
