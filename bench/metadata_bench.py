"""Side by side: Python's pickle.load of a .metadata versus dcpfetch reading the same checkpoint.

    python3 bench/make_metadata.py /tmp/bigmeta --tensors 10000 --chunks 100   # once, needs torch
    python3 bench/metadata_bench.py /tmp/bigmeta --dcpfetch target/release/dcpfetch

Python's side is `pickle.load` alone (torch imported beforehand, so that its classes resolve), the
way torch's FileSystemReader.read_metadata loads it; its memory is counted above the peak RSS it
had before `pickle.load` (torch imported). dcpfetch's side is a whole process:
`dcpfetch plan CKPT --select <one tensor> --json` parses the metadata, links every chunk to its
storage entry, resolves the selection, stats the shard files and plans, so it does strictly more.
Each is run `--repeat` times, alternating and swapping which goes first; the medians and their
ratio are printed, with peak RSS. Times on this VM vary by up to 2x from run to run with how fast
the kernel hands back freed memory: use several repeats.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

PY = r"""
import pickle, sys, time, warnings, resource
warnings.filterwarnings("ignore")
import torch, torch.distributed.checkpoint  # noqa: F401  (the classes the pickle names)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    md = pickle.load(f)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(md.storage_data), base)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    meta = os.path.join(a.checkpoint, ".metadata")
    py, rs, py_rss, rs_rss, py_base = [], [], 0, 0, 0
    def run_python():
        nonlocal py_rss, entries, py_base
        out = subprocess.run([sys.executable, "-c", PY, meta], check=True, capture_output=True, text=True).stdout.split()
        py.append(float(out[0]))
        py_rss = max(py_rss, int(out[1]))
        entries = int(out[2])
        py_base = max(py_base, int(out[3]))

    def run_dcpfetch():
        nonlocal rs_rss
        t = time.perf_counter()
        p = subprocess.Popen(
            [a.dcpfetch, "plan", a.checkpoint, "--select", "model.layers.0.block.0.weight", "--json"],
            stdout=subprocess.DEVNULL,
        )
        _, status, ru = os.wait4(p.pid, 0)
        rs.append(time.perf_counter() - t)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("dcpfetch plan failed")
        rs_rss = max(rs_rss, ru.ru_maxrss)

    entries = 0
    # Alternate which goes first: each frees gigabytes the next one must get back from the kernel.
    for i in range(a.repeat):
        for f in (run_python, run_dcpfetch) if i % 2 == 0 else (run_dcpfetch, run_python):
            f()
    p, r = statistics.median(py), statistics.median(rs)
    print(f".metadata: {os.path.getsize(meta) / 1e6:.0f} MB, {entries} storage entries, {a.repeat} runs each")
    print(f"python pickle.load:        median {p:6.2f} s  (runs {', '.join(f'{x:.2f}' for x in py)})")
    print(f"dcpfetch plan (process):   median {r:6.2f} s  (runs {', '.join(f'{x:.2f}' for x in rs)})")
    print(f"ratio python / dcpfetch:   {p / r:.2f}x")
    above = py_rss - py_base
    print(f"peak RSS: python {py_rss / 1024:.0f} MiB, of which {py_base / 1024:.0f} MiB before pickle.load (torch imported)")
    print(f"          python above that baseline {above / 1024:.0f} MiB, dcpfetch {rs_rss / 1024:.0f} MiB (whole process)")
    print(f"ratio dcpfetch / python: time {r / p:.2f}x, memory {rs_rss / above:.2f}x (of python above its baseline)")


if __name__ == "__main__":
    main()
