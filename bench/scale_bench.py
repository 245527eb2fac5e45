"""Every command of dcpfetch on checkpoints of growing size: wall time and peak RSS per storage entry.

    # checkpoints of 10k, 100k, 1M and 4M storage entries in the two shapes (needs torch):
    for n in 10000 100000 1000000 4000000; do
      python3 bench/make_metadata.py CKPTS/one-$n --tensors $n --chunks 1 --files 64 --rows 1 --cols 4 --archives
      python3 bench/make_metadata.py CKPTS/fsdp-$n --tensors $((n / 100)) --chunks 100 --files 100 --rows 1 --cols 4 --archives
    done
    python3 bench/scale_bench.py CKPTS/one-* CKPTS/fsdp-* --out-dir SCRATCH --save results.pickle
    python3 bench/scale_bench.py --table results.pickle   # the tables of docs/performance.md

Each command runs as its own process (stdout to /dev/null, or read line by line for the time to
the first line of `ls` and `plan`); its wall time and peak RSS (`wait4`) are divided by the
checkpoint's storage entries. The last column of each command is the ratio of the largest
checkpoint's per-entry figure to the smallest one's: flat is 1.0. Items are real `torch.save`
archives (`--archives`), so `verify` and `fetch` run their whole path.
"""

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time


def commands(ck, first, out_dir):
    """(name, argv, streams): the commands of the issue, each over the whole checkpoint unless said."""
    dcp = lambda *args: [A.dcpfetch, *args]  # noqa: E731
    return [
        ("ls", dcp("ls", ck), True),
        ("ls --json", dcp("ls", ck, "--json"), False),
        ("plan (one tensor)", dcp("plan", ck, "--select", first), False),
        ("plan", dcp("plan", ck), True),
        ("plan --json", dcp("plan", ck, "--json"), False),
        ("fetch -o DIR", dcp("fetch", ck, "-q", "-o", out_dir), False),
        ("fetch -o - raw", dcp("fetch", ck, "-q", "-o", "-"), False),
        ("fetch -o - tar", dcp("fetch", ck, "-q", "-o", "-", "--format", "tar"), False),
        ("verify", dcp("verify", ck, "-q"), False),
        ("verify --quick", dcp("verify", ck, "-q", "--quick"), False),
        ("bench", dcp("bench", ck, "-q", "--gap-sizes", "0", "--repeat", "1"), False),
    ]


def run(argv, streams):
    """Wall seconds, CPU seconds (user + system), seconds to the first line of stdout (when
    `streams`), peak RSS in bytes."""
    t = time.perf_counter()
    first = None
    if streams:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.readline()
        first = time.perf_counter() - t
        while p.stdout.read(1 << 20):
            pass
    else:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.read().decode()[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, first, ru.ru_maxrss * 1024


def entries_of(ck):
    """Storage entries, from dcpfetch's own `ls --json` (no torch needed here), read in a child
    process: this one stays small, because a child forked from it starts with its peak RSS."""
    ls = subprocess.Popen([A.dcpfetch, "ls", ck, "--json"], stdout=subprocess.PIPE)
    # The document is pretty-printed: `"storage_entries": N,` is a line of `totals`, scanned for
    # rather than parsing gigabytes of JSON.
    count = "import sys; print([l for l in sys.stdin if l.strip().startswith('\"storage_entries\"')][-1].split(':')[1].strip(' ,\\n'))"
    out = subprocess.run([sys.executable, "-c", count], stdin=ls.stdout, capture_output=True, check=True)
    ls.stdout.close()
    if ls.wait() != 0:
        raise SystemExit(f"dcpfetch ls {ck} failed")
    return int(out.stdout)


def table(rows):
    """Markdown tables, one per shape: a row per command, per size wall and CPU microseconds and
    peak RSS bytes per entry, then the ratio of the largest size's figures to the smallest's."""
    shapes = {}
    for ck, n, meta, name, wall, cpu, first, rss in rows:
        shapes.setdefault(ck.rsplit("-", 1)[0], {}).setdefault(name, {})[n] = (wall, cpu, first, rss)
    out = []
    for shape, cmds in shapes.items():
        sizes = sorted({n for by_n in cmds.values() for n in by_n})
        label = lambda n: f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"  # noqa: E731
        head = ["command"] + [f"{label(n)}: wall / CPU us, RSS B" for n in sizes] + [f"{label(sizes[-1])} / {label(sizes[0])}"]
        out += [f"**{shape}**", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for name, by_n in cmds.items():
            cells = [name]
            for n in sizes:
                if n not in by_n:
                    cells.append("")
                    continue
                wall, cpu, first, rss = by_n[n]
                f = f" (first line {first:.2f} s)" if first is not None and n == sizes[-1] else ""
                cells.append(f"{wall / n * 1e6:.1f} / {cpu / n * 1e6:.1f}, {rss / n:.0f}{f}")
            lo, hi = by_n.get(sizes[0]), by_n.get(sizes[-1])
            if lo and hi:
                r = lambda i: (hi[i] / sizes[-1]) / (lo[i] / sizes[0])  # noqa: E731
                cells.append(f"{r(0):.2f} / {r(1):.2f}, {r(3):.2f}")
            else:
                cells.append("")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main():
    global A
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--out-dir", help="scratch folder for fetch -o DIR (emptied per run)")
    ap.add_argument("--only", action="append", help="run only the commands of these names")
    ap.add_argument("--first", default="model.layers.0.block.0.weight", help="the tensor of `plan (one tensor)`")
    ap.add_argument("--save", help="append the results to this pickle (for --table)")
    ap.add_argument("--table", help="print the Markdown tables of the results saved in this pickle")
    A = ap.parse_args()
    if A.table:
        with open(A.table, "rb") as f:
            print(table(pickle.load(f)))
        return
    rows = []
    for ck in A.checkpoints:
        n = entries_of(ck)
        meta = os.path.getsize(os.path.join(ck, ".metadata"))
        for name, argv, streams in commands(ck, A.first, os.path.join(A.out_dir, "copy")):
            if A.only and name not in A.only:
                continue
            shutil.rmtree(os.path.join(A.out_dir, "copy"), ignore_errors=True)
            wall, cpu, first, rss = run(argv, streams)
            rows.append((os.path.basename(ck.rstrip("/")), n, meta, name, wall, cpu, first, rss))
            f = f", first line {first:.3f} s" if first is not None else ""
            print(
                f"{rows[-1][0]:>14} {n:>8} {name:<18} {wall:8.3f} s {wall / n * 1e6:7.2f} us/entry "
                f"cpu {cpu:8.3f} s {cpu / n * 1e6:7.2f} us/entry "
                f"{rss / 2**20:8.1f} MiB {rss / n:7.0f} B/entry{f}",
                flush=True,
            )
    shutil.rmtree(os.path.join(A.out_dir, "copy"), ignore_errors=True)
    if A.save:
        old = []
        if os.path.exists(A.save):
            with open(A.save, "rb") as f:
                old = pickle.load(f)
        with open(A.save, "wb") as f:
            pickle.dump(old + rows, f)


if __name__ == "__main__":
    main()
