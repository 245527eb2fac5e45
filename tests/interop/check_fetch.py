"""Proves that torch loads exactly the original tensors from a folder dcpfetch fetched.

Run by hand (needs torch; not part of CI):

    cargo build --release
    python3 tests/interop/check_fetch.py --dcpfetch target/release/dcpfetch \
        --checkpoint fixtures/model --select 'model.*'

For each run it: asks `dcpfetch ls --json` which fqns the selection names; runs `dcpfetch fetch` into
a fresh folder; then `torch.distributed.checkpoint.load`s those fqns from the fetched folder and from
the original, and requires every tensor to be equal (bit for bit) and every bytes entry to be equal.
It also checks that the fetched shard files have their original sizes and hold zeros outside the
selected items. Any extra arguments after `--` go to `dcpfetch fetch` (e.g. `-- --max-gap-size 0`).
Without --checkpoint it runs a built-in list of fixtures and selections, those the running torch
can load: under torch 2.15 every fixture but `torch1_13`; under torch 2.5.1 or 1.13.1 (each in its
own venv: `pip install torch==1.13.1 'numpy<2'`) the fixture that version wrote:

    /path/to/venv-1.13/bin/python tests/interop/check_fetch.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

# The DCP API of the running torch (2.15, 2.5 or 1.13: fixtures/torch_compat.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures"))
import torch_compat  # noqa: E402
from torch_compat import dcp  # noqa: E402

import torch  # noqa: E402

CASES = [
    ("fixtures/single", []),
    ("fixtures/single", ["--select", "dtypes.*"]),
    ("fixtures/model", ["--select", "model.*"]),
    ("fixtures/model", ["--select", "model.layers.1.*", "--select", "optim.state.layers.1.*"]),
    ("fixtures/model", ["--exclude", "optim.*"]),
    ("fixtures/dtensor", []),
    ("fixtures/dtensor", ["--select", "dt.shard1"]),
    ("fixtures/per_item", ["--select", "*"]),
    ("fixtures/zstd", []),
    ("fixtures/per_rank", []),
    ("fixtures/torch2_5", []),
    ("fixtures/torch2_5", ["--select", "dtypes.*", "--exclude", "*.bool"]),
    ("fixtures/torch1_13", []),
    ("fixtures/torch1_13", ["--select", "model.*", "--select", "config"]),
]


def cases_for_this_torch():
    """The fixtures the running torch can load: each older torch its own; torch 2.15 all but
    torch1_13, whose legacy classes it refuses ("expected BytesStorageMetadata but found
    <class 'torch.distributed._shard.checkpoint.metadata.BytesStorageMetadata'>")."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 0):
        return [c for c in CASES if c[0] == "fixtures/torch1_13"]
    if version < (2, 15):
        return [c for c in CASES if c[0] == "fixtures/torch2_5"]
    return [c for c in CASES if c[0] != "fixtures/torch1_13"]


def dcpfetch(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


def template(meta, fqn):
    """A state-dict value of the right shape and dtype for an fqn, from `ls --json`."""
    e = meta[fqn]
    if e["kind"] == "bytes":
        return None
    return torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"]))


def load(folder, fqns, meta):
    sd = {f: template(meta, f) for f in fqns}
    torch_compat.load(sd, folder)
    return sd


def check(binary, checkpoint, selection, fetch_extra):
    listing = json.loads(dcpfetch(binary, "ls", checkpoint, "--json", *selection))
    meta = {e["fqn"]: e for e in listing["entries"]}
    fqns = sorted(meta)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "copy")
        dcpfetch(binary, "fetch", checkpoint, "-o", out, "--quiet", *selection, *fetch_extra)
        per_rank = [m["name"] for m in listing["metadata_files"] if m["name"] != ".metadata"]
        if per_rank:
            # Per-rank checkpoints: each rank reads its own __N.metadata (use_collectives=False).
            for name in per_rank:
                rank = int(name[2:].split(".")[0])
                got = _load_rank(out, rank, fqns, meta)
                want = _load_rank(checkpoint, rank, fqns, meta)
                _compare(got, want, f"{checkpoint} rank {rank}")
        else:
            got = load(out, fqns, meta)
            want = load(checkpoint, fqns, meta)
            _compare(got, want, checkpoint)
        _check_holes(checkpoint, out, listing)
    print(f"ok  {checkpoint} {' '.join(selection) or '(everything)'}: {len(fqns)} entries equal")


def _load_rank(folder, rank, fqns, meta):
    reader = dcp.FileSystemReader(folder)
    md = reader.read_metadata(rank=rank)
    present = [f for f in fqns if f in md.state_dict_metadata]
    sd = {f: template(meta, f) for f in present}
    # A single process reads `.metadata`; hand the reader this rank's file instead.
    reader.read_metadata = lambda *a, **k: md
    torch_compat.load(sd, storage_reader=reader)
    return sd


def _compare(got, want, what):
    assert got.keys() == want.keys(), what
    for k in got:
        a, b = got[k], want[k]
        if isinstance(b, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(
                a.reshape(-1).contiguous().view(torch.uint8),
                b.reshape(-1).contiguous().view(torch.uint8),
            )
            assert same, f"{what}: {k} differs"
        else:
            assert a == b, f"{what}: {k}: {a!r} != {b!r}"


def _check_holes(checkpoint, out, listing):
    """Every fetched shard file has the original size; selected ranges equal, the rest zero."""
    wanted = {}
    for e in listing["entries"]:
        for c in e["chunks"]:
            wanted.setdefault(c["file"], []).append((c["offset"], c["offset"] + c["length"]))
    for name in os.listdir(checkpoint):
        if name.endswith(".metadata"):
            src = open(os.path.join(checkpoint, name), "rb").read()
            assert open(os.path.join(out, name), "rb").read() == src, f"{name} not copied byte for byte"
            continue
        src = open(os.path.join(checkpoint, name), "rb").read()
        dst = open(os.path.join(out, name), "rb").read()
        assert len(src) == len(dst), f"{name}: size {len(dst)} != {len(src)}"
        mask = bytearray(len(src))
        for a, b in wanted.get(name, []):
            assert dst[a:b] == src[a:b], f"{name}: bytes {a}..{b} differ"
            mask[a:b] = b"\x01" * (b - a)
        stray = [i for i, m in enumerate(mask) if not m and dst[i] != 0]
        assert not stray, f"{name}: {len(stray)} bytes outside the selection are not zero"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--checkpoint")
    ap.add_argument("--select", action="append", default=[])
    ap.add_argument("--exclude", action="append", default=[])
    ap.add_argument("rest", nargs="*")
    a = ap.parse_args()
    if a.checkpoint:
        sel = [x for s in a.select for x in ("--select", s)] + [x for s in a.exclude for x in ("--exclude", s)]
        check(a.dcpfetch, a.checkpoint, sel, a.rest)
    else:
        for ck, sel in cases_for_this_torch():
            check(a.dcpfetch, ck, sel, a.rest)
            check(a.dcpfetch, ck, sel, ["--max-gap-size", "0", "--part-size", "4KiB", "--concurrency", "3"])


if __name__ == "__main__":
    sys.exit(main())
