"""Proves that what `dcpfetch export` wrote holds exactly the tensors torch loads from the checkpoint.

Run by hand (needs torch and safetensors; numpy for `.npy`; not part of CI):

    cargo build --release
    target/release/dcpfetch export fixtures/model --select 'model.*' -o /tmp/m.safetensors
    python3 tests/interop/check_export.py fixtures/model /tmp/m.safetensors
    python3 tests/interop/check_export.py fixtures/model /tmp/m.safetensors --strip-prefix model.
    python3 tests/interop/check_export.py fixtures/single /tmp/x.npy --keys dtypes.float32

EXPORT is one `.safetensors` file (also what `-o -` streams), a folder in the Hugging Face layout
(`model.safetensors.index.json` and the `model-0000i-of-0000N.safetensors` files it names), or one
`.npy` file. Exports are read the way their users read them: `safetensors.torch.load_file`, or
`numpy.load`.

The same tensors are loaded from CKPT_DIR with `torch.distributed.checkpoint.load` into zero-filled
full-size tensors (shape and dtype from `FileSystemReader(CKPT_DIR).read_metadata()`; a checkpoint
with only per-rank `__N.metadata` files is loaded once per rank and each rank's chunks combined).
Each key must have the same dtype, shape and bytes. An export key is the fqn minus
`--strip-prefix`. Without `--keys`, every tensor in the export is checked; with `--keys FQN ...`
(checkpoint fqns) the export must hold exactly those, and any other key in it is an error. A `.npy`
file holds one tensor: name its fqn with `--keys`, unless the checkpoint has a single tensor.

For a folder it also checks the index: every file it names exists and holds exactly the keys the
`weight_map` gives it, no `model-*.safetensors` file is left out, and `metadata.total_size` is the
sum of the tensors' byte sizes.

Prints one line per key and a summary; exit status 0 when every key matched, 1 otherwise.
"""

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

# The DCP API of the running torch (2.15, 2.5 or 1.13: fixtures/torch_compat.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures"))
import torch_compat  # noqa: E402
from torch_compat import dcp  # noqa: E402

import torch  # noqa: E402

INDEX = "model.safetensors.index.json"


class Problems(list):
    def add(self, msg):
        print(f"FAIL {msg}")
        self.append(msg)


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------


def load_export(path, problems, npy_key):
    """Export key -> tensor."""
    if os.path.isdir(path):
        return load_hf_folder(path, problems)
    if path.endswith(".npy"):
        import numpy as np

        arr = np.load(path, allow_pickle=False)
        return {npy_key: torch.from_numpy(np.ascontiguousarray(arr))}
    from safetensors.torch import load_file

    return load_file(path)


def load_hf_folder(folder, problems):
    from safetensors.torch import load_file

    index_path = os.path.join(folder, INDEX)
    if not os.path.exists(index_path):
        problems.add(f"{folder}: no {INDEX}")
        return {}
    with open(index_path) as f:
        index = json.load(f)
    weight_map = index.get("weight_map", {})
    files = sorted(set(weight_map.values()))
    on_disk = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    for n in on_disk:
        if n not in files:
            problems.add(f"{INDEX}: {n} is in the folder but not in the weight_map")
    n_files = len(files)
    for i, n in enumerate(files, 1):
        want = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        if n != want:
            problems.add(f"{INDEX}: file {i} of {n_files} is named {n}, expected {want}")
    tensors = {}
    for n in files:
        p = os.path.join(folder, n)
        if not os.path.exists(p):
            problems.add(f"{INDEX}: names {n}, which does not exist")
            continue
        got = load_file(p)
        for k in got:
            if weight_map.get(k) != n:
                problems.add(f"{n}: holds {k!r}, which the weight_map puts in {weight_map.get(k)}")
            if k in tensors:
                problems.add(f"{n}: {k!r} is also in another file")
        tensors.update(got)
    for k, n in weight_map.items():
        if k not in tensors:
            problems.add(f"{INDEX}: {k!r} -> {n}, but {n} does not hold it")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    listed = index.get("metadata", {}).get("total_size")
    if listed != total:
        problems.add(f"{INDEX}: metadata.total_size is {listed}, the tensors hold {total} bytes")
    print(f"index: {len(weight_map)} keys in {n_files} files, total_size {listed}")
    return tensors


# ---------------------------------------------------------------------------------------------
# the checkpoint, through torch
# ---------------------------------------------------------------------------------------------


def is_tensor(smd):
    return type(smd).__name__ == "TensorStorageMetadata"


def checkpoint_entries(ckpt):
    """fqn -> (metadata of the entry, rank whose file lists it or None); per-rank files united."""
    names = os.listdir(ckpt)
    if ".metadata" in names:
        md = dcp.FileSystemReader(ckpt).read_metadata()
        return {f: smd for f, smd in md.state_dict_metadata.items()}, None
    ranks = sorted(int(n[2:].split(".")[0]) for n in names if n.startswith("__") and n.endswith(".metadata"))
    metas = {r: dcp.FileSystemReader(ckpt).read_metadata(rank=r) for r in ranks}
    entries = {}
    for md in metas.values():
        for f, smd in md.state_dict_metadata.items():
            entries.setdefault(f, smd)
    return entries, metas


def zeros_like_entry(smd):
    return torch.zeros(tuple(smd.size), dtype=smd.properties.dtype)


def dcp_load_full(ckpt, fqns, entries, per_rank):
    if per_rank is None:
        sd = {f: zeros_like_entry(entries[f]) for f in fqns}
        torch_compat.load(sd, ckpt)
        return sd
    # Each rank's __N.metadata lists only what that rank wrote: load each, keep its chunks.
    out = {f: zeros_like_entry(entries[f]) for f in fqns}
    for md in per_rank.values():
        present = [f for f in fqns if f in md.state_dict_metadata]
        if not present:
            continue
        reader = dcp.FileSystemReader(ckpt)
        reader.read_metadata = lambda *a, md=md, **k: md
        sd = {f: zeros_like_entry(md.state_dict_metadata[f]) for f in present}
        torch_compat.load(sd, storage_reader=reader)
        for f in present:
            for c in md.state_dict_metadata[f].chunks:
                r = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
                out[f][r].copy_(sd[f][r])
    return out


# ---------------------------------------------------------------------------------------------


def raw_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def describe(t):
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", metavar="CKPT_DIR")
    ap.add_argument("export", metavar="EXPORT")
    ap.add_argument("--strip-prefix", default="", metavar="P")
    ap.add_argument("--keys", nargs="+", metavar="FQN", help="checkpoint fqns the export must hold")
    a = ap.parse_args()

    problems = Problems()
    entries, per_rank = checkpoint_entries(a.ckpt)
    tensors = [f for f, smd in entries.items() if is_tensor(smd)]

    def export_key(fqn):
        return fqn[len(a.strip_prefix) :] if a.strip_prefix and fqn.startswith(a.strip_prefix) else fqn

    npy_key = None
    if a.export.endswith(".npy"):
        keys = a.keys or (tensors if len(tensors) == 1 else None)
        if not keys or len(keys) != 1:
            sys.exit("a .npy file holds one tensor: name its fqn with --keys FQN")
        npy_key = export_key(keys[0])
    got = load_export(a.export, problems, npy_key)

    if a.keys:
        fqn_of = {export_key(f): f for f in a.keys}
        for k in sorted(set(got) - set(fqn_of)):
            problems.add(f"{k}: in the export but not among --keys")
    else:
        # An fqn with the prefix wins over one that is already the stripped name.
        by_key = {export_key(f): f for f in sorted(entries, key=lambda f: f.startswith(a.strip_prefix))}
        fqn_of = {k: by_key.get(k, a.strip_prefix + k) for k in got}

    loadable = []
    for k, f in fqn_of.items():
        if f not in entries:
            problems.add(f"{k}: no fqn {f!r} in the checkpoint")
        elif not is_tensor(entries[f]):
            problems.add(f"{k}: {f!r} is a bytes entry of the checkpoint, not a tensor")
        elif k not in got:
            problems.add(f"{k}: missing from the export")
        else:
            loadable.append(f)

    want = dcp_load_full(a.ckpt, loadable, entries, per_rank) if loadable else {}
    ok = 0
    for f in loadable:
        k = export_key(f)
        x, y = got[k], want[f]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.add(f"{k}: export has {describe(x)}, torch loads {describe(y)}")
        elif not torch.equal(raw_bytes(x), raw_bytes(y)):
            n = int((raw_bytes(x) != raw_bytes(y)).sum())
            problems.add(f"{k}: {describe(x)}, {n} of {y.numel() * y.element_size()} bytes differ")
        else:
            ok += 1
            print(f"ok   {k}: {describe(x)}" + (f" (fqn {f})" if f != k else ""))

    print(f"{a.export}: {ok} of {len(fqn_of)} keys equal to torch's dcp.load of {a.ckpt}, {len(problems)} problems")
    return 1 if problems or not fqn_of else 0


if __name__ == "__main__":
    sys.exit(main())
