"""Checks dcpfetch against real torch on DCP checkpoints that the committed fixtures do not cover.

Run by hand (needs torch 2.15 with numpy and zstandard; not part of CI), from the repository root:

    cargo build --release
    OMP_NUM_THREADS=1 python3 tests/interop/check_unseen.py --dcpfetch target/release/dcpfetch
    python3 tests/interop/check_unseen.py --keep /tmp/unseen        # keep the checkpoints
    python3 tests/interop/check_unseen.py --only mesh2d --only names  # a few checkpoints only

It writes, in a temporary folder, a series of new checkpoints with real torch (single process, and
2, 3 or 4 gloo processes on 127.0.0.1 started with torch.multiprocessing spawn): 3-D/4-D/5-D,
channels_last, expanded and size-1 shapes; every dtype torch 2.15 can save (uint16/32/64, float8
variants, float4_e2m1fn_x2, complex32, quantized); 200+ character and unicode fqns and fqns holding
glob metacharacters; a 16 MiB tensor; 2000 entries; FileSystemWriter options (thread_count=4,
per_thread_copy_ahead, sync_files=False, single_file_per_rank=False on 2 ranks); DTensors on a
2x2 DeviceMesh and a 1-D mesh of 4 with uneven and empty shards; get_state_dict of real models
with SGD (momentum) and, under FSDP2 on 2 ranks, AdamW, both with several param groups holding
nested values; use_collectives=False on 3 ranks; the ZStandard extension with DTensors; and a
folder saved twice (overwrite=True).

For each checkpoint it checks, and prints one line per check:

  ls      `dcpfetch ls --json` against torch's FileSystemReader.read_metadata() (or
          read_metadata(rank=N) for each __N.metadata): per fqn kind, dtype, shape, strides,
          requires_grad, the multiset of stored copies (offsets, sizes, file, offset, length,
          transform_descriptors, metadata_file), entry stored_bytes/files; the metadata files
          (size, version, protocol, checkpoint_id, save_id) and the totals.
  verify  `dcpfetch verify --json` exits 0 with every check pass or skipped, twice with a
          --manifest (written, then compared).
  fetch   for each selection: the fqns `dcpfetch ls --json SEL` reports equal the fqns the glob
          matches (an independent Python glob); `dcpfetch fetch -o OUT SEL` then
          torch.distributed.checkpoint.load of those fqns from OUT equals loading them from the
          original (bit for bit; templates are zeros of the metadata's shape and dtype; bytes
          entries compared with ==); metadata files are copied byte for byte, every shard file
          has its original size and holds the original bytes in the selected items' ranges and
          zeros elsewhere.

Exit status: 0 when every check passed, 1 otherwise.
"""

import argparse
import collections
import json
import logging
import os
import pickle
import pickletools
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import unicodedata
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------
# checkpoints written by one process
# ----------------------------------------------------------------------------------------------


def _save(sd, path, **writer_kw):
    dcp.save(sd, storage_writer=FileSystemWriter(path, **writer_kw), no_dist=True)


def gen_shapes(path):
    torch.manual_seed(10)
    conv = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    conv3d = torch.randn(4, 2, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    assert conv.stride() == (27, 1, 9, 3)
    sd = {
        "shape": {
            "d3": torch.randn(2, 3, 4),
            "d4": torch.randn(2, 3, 4, 5).to(torch.float16),
            "d5": torch.randn(2, 1, 3, 2, 2).to(torch.bfloat16),
            "d6": torch.arange(64, dtype=torch.int16).reshape(2, 2, 2, 2, 2, 2),
            "permuted3": torch.randn(3, 4, 5).permute(2, 0, 1),  # non-contiguous, strides (1, 20, 5)
            "one": torch.randn(1),
            "row": torch.randn(1, 7),
            "mid1": torch.randn(5, 1, 3),
            "ones4": torch.randn(1, 1, 1, 1),
            "zero_mid": torch.empty(3, 0, 2),
            "expanded": torch.randn(3, 1).expand(3, 4),  # stride (1, 0)
        },
        "conv": {"weight": conv, "bias": torch.randn(8), "w3d": conv3d},
    }
    _save(sd, path)


DTYPE_CANDIDATES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "int1", "int4", "uint1", "uint4", "uint7",
]


def random_tensor(dt, shape, gen):
    """Random bit patterns of dtype dt (NaNs and infinities included): bit-exact checks bite."""
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = int(np.prod(shape)) * dt.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    last = shape[-1] * dt.itemsize
    return raw.view(*shape[:-1], last).view(dt)


def probe_dtypes(scratch):
    """Which dtypes a single-process dcp.save + dcp.load round trip works for in this torch."""
    ok, notes = [], []
    gen = torch.Generator().manual_seed(0)
    for name in DTYPE_CANDIDATES:
        dt = getattr(torch, name, None)
        if dt is None:
            notes.append(f"{name}: not in this torch")
            continue
        p = os.path.join(scratch, f"probe_{name}")
        try:
            t = random_tensor(dt, (2, 4), gen)
            _save({"x": t}, p)
            sd = {"x": torch.zeros(2, 4, dtype=dt)}
            dcp.load(sd, checkpoint_id=p, no_dist=True)
            ok.append(name)
        except BaseException as e:  # CheckpointException is a BaseException
            if isinstance(e, KeyboardInterrupt):
                raise
            notes.append(f"{name}: torch's dcp.save/load fails: {_first_line(e)}")
        shutil.rmtree(p, ignore_errors=True)
    return ok, notes


def _first_line(e):
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        e = inner
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    return f"{type(e).__name__}: {msg}"[:160]


def gen_dtypes(path, names):
    gen = torch.Generator().manual_seed(11)
    sd = {"dtypes": {}, "sized": {}}
    for name in names:
        dt = getattr(torch, name)
        sd["dtypes"][name] = random_tensor(dt, (3, 4), gen)
        sd["sized"][name] = random_tensor(dt, (2, 3, 5), gen)  # 3-D, odd byte counts
    _save(sd, path)


def gen_quantized(path):
    torch.manual_seed(12)
    sd = {
        "q": {
            "qint8": torch.quantize_per_tensor(torch.randn(4, 6), 0.05, 3, torch.qint8),
            "quint8": torch.quantize_per_tensor(torch.randn(5), 0.1, 128, torch.quint8),
            "qint32": torch.quantize_per_tensor(torch.randn(2, 3), 0.001, 0, torch.qint32),
        },
        "plain": torch.randn(3),
    }
    _save(sd, path)


QUANT = {"q.qint8": (0.05, 3), "q.quint8": (0.1, 128), "q.qint32": (0.001, 0)}


def quantized_template(fqn, tmd):
    """DCP does not record scale/zero point: the loader has to know them (here: we do)."""
    if fqn in QUANT:
        scale, zp = QUANT[fqn]
        return torch._empty_affine_quantized(tuple(tmd.size), scale=scale, zero_point=zp, dtype=tmd.properties.dtype)
    return None


LONG_SEG = "segment_with_a_fairly_long_name_" * 7  # 224 characters
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")
assert NFC != NFD


def names_state_dict():
    torch.manual_seed(13)
    deep = {}
    node = deep
    for i in range(12):  # a 12-level nested path of ~30-character keys
        node = node.setdefault(f"level_{i:02d}_of_a_deeply_nested_module", {})
    node["weight"] = torch.randn(2, 3)
    return {
        "long": {
            LONG_SEG: torch.randn(4),  # one 224-character key
            LONG_SEG + "x" * 300: torch.randn(2, 2),  # 524 characters: BINUNICODE, not SHORT_
            "deep": deep,  # fqn of ~400 characters
            "bytes_" + "b" * 250: "a bytes entry with a 256-character key",
        },
        "unicode": {
            "模型.权重": torch.randn(3),  # a dot inside the key
            "слой": torch.randn(2),
            "🔥🚀": torch.randn(2, 2),
            NFC: torch.ones(1),
            NFD: torch.zeros(1),  # same text, other normalization: a different fqn
            "ﬁ": torch.randn(1),  # ligature, one character
            "مرحبا": "rtl bytes entry",
        },
        "glob": {
            "a*b": torch.randn(2),
            "w[0]": torch.randn(2),
            "q?": torch.randn(2),
            "{x,y}": torch.randn(2),
            "back\\slash": torch.randn(2),
            "tab\there": torch.randn(2),
            "sp ace": torch.randn(2),
            "path/like/../../x": torch.randn(2),  # a '/' and '..' in an fqn (tar member names?)
        },
    }


def gen_names(path):
    _save(names_state_dict(), path)


def gen_large(path):
    torch.manual_seed(14)
    sd = {
        "small": {"before": torch.randn(10), "after": torch.randn(3, 3)},
        "big": torch.randn(4096, 1024),  # 16 MiB: one item spans three 8 MiB requests
        "step": 123,
    }
    _save(sd, path)


def gen_many_tiny(path):
    torch.manual_seed(15)
    dts = [torch.float32, torch.int64, torch.bfloat16, torch.uint8, torch.bool]
    tiny = {}
    for i in range(1900):
        dt = dts[i % len(dts)]
        t = torch.randn(i % 4, 2) if i % 7 else torch.randn(())
        tiny[f"{i:04d}"] = (t > 0) if dt == torch.bool else t.to(dt)
    cfg = {f"{i:03d}": (i if i % 2 else f"value {i}") for i in range(100)}
    _save({"tiny": tiny, "cfg": cfg}, path)


def gen_writer_opts(path):
    torch.manual_seed(16)
    sd = {f"t{i}": torch.randn(16 * (i + 1), 64) for i in range(10)}  # 4 KiB .. 40 KiB
    sd["mb"] = torch.randn(512, 512)  # 1 MiB, much more than per_thread_copy_ahead
    sd["meta"] = {"epoch": 3, "note": "thread_count=4"}
    _save(sd, path, thread_count=4, per_thread_copy_ahead=256, sync_files=False)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def gen_sgd_model(path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(17)
    model = SmallCNN().to(memory_format=torch.channels_last)
    groups = [
        {"params": [model.conv.weight, model.conv.bias], "lr": 0.1,
         "extra": {"schedule": {"kind": "cosine", "warmup": 10}, "tags": ["conv", "decay"]}},
        {"params": list(model.bn.parameters()) + list(model.head.parameters()), "lr": 0.01, "nesterov": True},
    ]
    optim = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(4, 3, 6, 6)).sum().backward()
        optim.step()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)


def overwrite_second():
    torch.manual_seed(19)
    return {"a": torch.randn(3).to(torch.float16), "d": torch.ones(2, 2, dtype=torch.int32), "step": 2}


def gen_overwrite(path):
    torch.manual_seed(18)
    first = {"a": torch.randn(64, 64), "b": torch.arange(100), "c": torch.randn(8, 8), "step": 1}
    _save(first, path, thread_count=4)
    _save(overwrite_second(), path, overwrite=True)  # one thread: __0_1..__0_3 are left stale


# ----------------------------------------------------------------------------------------------
# checkpoints written by several gloo processes
# ----------------------------------------------------------------------------------------------


def job_mesh2d(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh1 = init_device_mesh("cpu", (4,))
    torch.manual_seed(20)
    full = {
        "ss": torch.randn(7, 5),  # (Shard(0), Shard(1)): rows 4+3, columns 3+2
        "rs": torch.randn(9, 4),  # (Replicate(), Shard(0)): rows 5+4, stored once
        "s0s0": torch.randn(7, 3),  # (Shard(0), Shard(0)): rows 2+2+2+1
        "sr": torch.randn(6, 5).to(torch.bfloat16),  # (Shard(1), Replicate())
        "tiny": torch.randn(1, 3),  # (Shard(0), Shard(1)): the dp=1 shards are empty
        "d4": torch.randn(2, 3, 5, 6).to(torch.float16),  # (Shard(2), Shard(3)) of a 4-D tensor
        "rr": torch.randn(3, 3),  # (Replicate(), Replicate())
        "ints": torch.arange(33, dtype=torch.int64).reshape(11, 3),  # (Shard(0), Replicate())
        "m1_small": torch.randn(2, 8),  # 1-D mesh of 4, Shard(0): two empty shards
        "m1_cols": torch.randn(3, 5),  # 1-D mesh of 4, Shard(1): 2+2+1+0 columns
    }
    pl = {
        "ss": [Shard(0), Shard(1)], "rs": [Replicate(), Shard(0)], "s0s0": [Shard(0), Shard(0)],
        "sr": [Shard(1), Replicate()], "tiny": [Shard(0), Shard(1)], "d4": [Shard(2), Shard(3)],
        "rr": [Replicate(), Replicate()], "ints": [Shard(0), Replicate()],
    }
    sd = {"dt": {k: distribute_tensor(full[k], mesh, p) for k, p in pl.items()}}
    sd["dt"]["m1_small"] = distribute_tensor(full["m1_small"], mesh1, [Shard(0)])
    sd["dt"]["m1_cols"] = distribute_tensor(full["m1_cols"], mesh1, [Shard(1)])
    sd["plain"] = torch.randn(4, 2)
    sd["step"] = 77
    sd["meta"] = {"mesh": "2x2", "names": ["dp", "tp"]}
    dcp.save(sd, storage_writer=FileSystemWriter(path, thread_count=2))


def job_per_item_2ranks(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(21)
    sd = {
        "w": distribute_tensor(torch.randn(5, 4), mesh, [Shard(0)]),
        "v": distribute_tensor(torch.randn(3, 7), mesh, [Shard(1)]),
        "r": distribute_tensor(torch.randn(3, 3).to(torch.float64), mesh, [Replicate()]),
        "plain": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "step": 5,
        "name": "per item",
    }
    dcp.save(sd, storage_writer=FileSystemWriter(path, single_file_per_rank=False))


def job_zstd_dtensor(rank, world, path):
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(22)
    sd = {
        "ramp": distribute_tensor(torch.arange(9 * 33, dtype=torch.float32).reshape(9, 33), mesh, [Shard(0)]),
        "zeros": distribute_tensor(torch.zeros(256, 256), mesh, [Shard(1)]),
        "noise": distribute_tensor(torch.randn(5, 6, 7), mesh, [Shard(2)]),
        "rep": distribute_tensor(torch.randn(4, 4).to(torch.bfloat16), mesh, [Replicate()]),
        "one_row": distribute_tensor(torch.randn(1, 6), mesh, [Shard(0)]),
        "plain": torch.randn(10),
        "step": 9,
        "cfg": {"codec": "zstd", "level": 3},
    }
    dcp.save(sd, storage_writer=FileSystemWriter(path, thread_count=2, _extensions=[ZStandard()]))


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.fc1 = torch.nn.Linear(6, 7)
        self.fc2 = torch.nn.Linear(7, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, tok):
        return self.norm(self.fc2(torch.relu(self.fc1(self.embed(tok))))).sum()


def job_fsdp_adamw(rank, world, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(23)
    model = TinyMLP()
    for m in (model.fc1, model.fc2):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    decay = [model.embed.weight, model.fc1.weight, model.fc2.weight]
    no_decay = [model.fc1.bias, model.fc2.bias, model.norm.weight, model.norm.bias]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1, "extra": {"name": "decay", "sched": {"warmup": 5}}},
            {"params": no_decay, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ],
        lr=1e-3,
    )
    torch.manual_seed(24)
    tok = torch.randint(0, 11, (4, 5))
    for _ in range(2):
        optim.zero_grad()
        model(tok).backward()
        optim.step()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def job_nocoll_3ranks(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (3,))
    torch.manual_seed(25)
    sd = {
        "rows": distribute_tensor(torch.randn(7, 4), mesh, [Shard(0)]),  # 3+3+1 rows
        "cols": distribute_tensor(torch.randn(4, 5), mesh, [Shard(1)]),  # 2+2+1 columns
        "dt_rep": distribute_tensor(torch.randn(2, 2), mesh, [Replicate()]),
        "replicated": torch.randn(4, 4),  # a plain tensor, the same on every rank
        "step": 42,
    }
    torch.manual_seed(250 + rank)
    sd[f"rank{rank}"] = {"only": torch.randn(3) + rank, "info": f"written by rank {rank}"}
    dcp.save(sd, storage_writer=FileSystemWriter(path, thread_count=2), use_collectives=False)


JOBS = {
    "mesh2d": job_mesh2d,
    "per_item_2ranks": job_per_item_2ranks,
    "zstd_dtensor": job_zstd_dtensor,
    "fsdp_adamw": job_fsdp_adamw,
    "nocoll_3ranks": job_nocoll_3ranks,
}


def _worker(rank, world, port, root, jobs):
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for job in jobs:
            JOBS[job](rank, world, os.path.join(root, job))
            dist.barrier()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# the cases: what to generate and which selections to fetch
# ----------------------------------------------------------------------------------------------

# name -> (how many ranks (0: this process), description, [(selection args, extra fetch args)])
CASES = {
    "shapes": (0, "3-D..6-D, permuted, channels_last(_3d), expanded (stride 0), size-1 and size-0 dims", [
        (["--select", "conv.*"], []),
        (["--select", "shape.{d3,d4,permuted3,expanded}", "--select", "shape.*1*"], []),
    ]),
    "dtypes": (0, "random bit patterns of every dtype torch can save", [
        (["--select", "*.uint*", "--select", "*.float8_*", "--select", "*.complex32"], []),
        ([], ["--max-gap-size", "0", "--part-size", "4KiB"]),
    ]),
    "quantized": (0, "per-tensor quantized qint8/quint8/qint32", [([], [])]),
    "names": (0, "fqns of 200-500 characters, unicode (NFC vs NFD), glob metacharacters", [
        (["--select", "long.*", "--select", "unicode.🔥*", "--select", "unicode.caf*"], []),
        # docs/selection.md: `?` is one character and `[...]` one character of the set
        (["--select", "unicode.🔥*", "--select", "unicode.caf?", "--select", "unicode.[ﬁx]",
          "--select", "unicode.сл??"], []),
        (["--select", "glob.a\\*b", "--select", "glob.w\\[0]", "--select", "glob.\\{x,y\\}",
          "--select", "glob.back\\\\slash", "--select", "unicode.模型.权重"], []),
    ]),
    "large": (0, "one 16 MiB tensor (several 8 MiB requests)", [
        (["--select", "big"], []),
        (["--select", "big", "--select", "small.after"],
         ["--part-size", "1MiB", "--concurrency", "3", "--max-memory", "4MiB", "--max-gap-size", "0"]),
    ]),
    "many_tiny": (0, "2000 entries (1900 tiny tensors, 100 bytes entries)", [
        (["--select", "tiny.1*"], []),
        (["--select", "tiny.00[0-4]?", "--select", "cfg.*", "--exclude", "cfg.0[5-9]?"], ["--max-gap-size", "0"]),
    ]),
    "writer_opts": (0, "thread_count=4, per_thread_copy_ahead=256, sync_files=False", [
        (["--select", "t[0-4]", "--select", "meta.*"], []),
        (["--exclude", "mb"], []),
    ]),
    "sgd_model": (0, "get_state_dict of a channels_last CNN + SGD(momentum), 2 param groups, nested extras", [
        (["--select", "model.*"], []),
        (["--select", "optim.state.*.momentum_buffer", "--select", "optim.param_groups.*"], []),
    ]),
    "overwrite": (0, "saved twice into one folder (thread_count=4, then overwrite=True with 1 thread)", [
        ([], []),
    ]),
    "mesh2d": (4, "DTensors on a 2x2 mesh (Shard/Replicate mixes, uneven and empty shards) and a 1-D mesh of 4", [
        (["--select", "dt.*"], []),
        (["--select", "dt.{ss,rs,tiny}", "--select", "dt.m1_*", "--select", "step"], ["--max-gap-size", "0"]),
    ]),
    "per_item_2ranks": (2, "2 ranks, single_file_per_rank=False", [
        ([], []),
        (["--select", "w", "--select", "r"], []),
    ]),
    "zstd_dtensor": (2, "ZStandard extension with DTensors, 2 ranks, thread_count=2", [
        ([], []),
        (["--select", "zeros", "--select", "cfg.*"], []),
    ]),
    "fsdp_adamw": (2, "FSDP2 on 2 ranks, get_state_dict with AdamW, 2 param groups, nested extras", [
        (["--select", "model.*"], []),
        (["--select", "optim.state.fc1.*", "--select", "optim.param_groups.0.*"], []),
    ]),
    "nocoll_3ranks": (3, "use_collectives=False on 3 ranks (__N.metadata per rank)", [
        ([], []),
        (["--select", "rows", "--select", "rank2.*", "--select", "step"], []),
    ]),
}

TEMPLATES = {"quantized": quantized_template}


# ----------------------------------------------------------------------------------------------
# what torch says
# ----------------------------------------------------------------------------------------------


def metadata_names(path):
    names = os.listdir(path)
    if ".metadata" in names:
        return [".metadata"]
    per_rank = [n for n in names if re.fullmatch(r"__\d+\.metadata", n)]
    return sorted(per_rank, key=lambda n: int(n[2:].split(".")[0]))


def rank_of(name):
    return None if name == ".metadata" else int(name[2:].split(".")[0])


def torch_metadata(path):
    """[(metadata file name, Metadata)] as torch's FileSystemReader reads them."""
    out = []
    for name in metadata_names(path):
        r = rank_of(name)
        reader = FileSystemReader(path)
        out.append((name, reader.read_metadata() if r is None else reader.read_metadata(rank=r)))
    return out


def dtype_name(dt):
    return str(dt).removeprefix("torch.")


def expected_listing(path):
    """What `dcpfetch ls --json` should say, computed from torch's reading of the metadata."""
    mds = torch_metadata(path)
    entries = {}
    disagreements = []
    storage_entries = 0
    for mname, md in mds:
        for fqn, smd in md.state_dict_metadata.items():
            if isinstance(smd, TensorStorageMetadata):
                p = smd.properties
                e = {
                    "kind": "tensor",
                    "dtype": dtype_name(p.dtype),
                    "shape": list(smd.size),
                    "strides": None if getattr(p, "strides", None) is None else list(p.strides),
                    "requires_grad": bool(p.requires_grad),
                }
            else:
                assert isinstance(smd, BytesStorageMetadata), type(smd)
                e = {"kind": "bytes", "dtype": None, "shape": None, "strides": None, "requires_grad": None}
            if fqn in entries:
                old = {k: v for k, v in entries[fqn].items() if k != "copies"}
                if old != e:  # rank files may disagree (strides of each rank's local shard)
                    disagreements.append((fqn, mname, old, e))
                continue
            entries[fqn] = dict(e, copies=[])
        for idx, si in md.storage_data.items():
            storage_entries += 1
            smd = md.state_dict_metadata[idx.fqn]
            if isinstance(smd, TensorStorageMetadata):
                offs = list(idx.offset)
                sizes = [list(c.sizes) for c in smd.chunks if list(c.offsets) == offs]
                assert len(sizes) == 1, (idx, sizes)
                key = (tuple(offs), tuple(sizes[0]))
            else:
                key = (None, None)
            td = tuple(getattr(si, "transform_descriptors", None) or ())
            entries[idx.fqn]["copies"].append(key + (si.relative_path, si.offset, si.length, td, mname))
    files = []
    for mname, _ in mds:
        raw = open(os.path.join(path, mname), "rb").read()
        proto = next(arg for op, arg, _ in pickletools.genops(raw) if op.name == "PROTO")
        md = pickle.loads(raw)  # our own files; read directly, read_metadata() fills storage_meta in
        sm = getattr(md, "storage_meta", None)
        files.append({
            "name": mname,
            "size": len(raw),
            "version": getattr(md, "version", None),
            "protocol": proto,
            "checkpoint_id": None if sm is None or sm.checkpoint_id is None else str(sm.checkpoint_id),
            "save_id": None if sm is None else sm.save_id,
        })
    chunk_keys = {(f, c[0]) for f, e in entries.items() for c in e["copies"]}
    all_copies = [c for e in entries.values() for c in e["copies"]]
    totals = {
        "entries": len(entries),
        "tensors": sum(e["kind"] == "tensor" for e in entries.values()),
        "bytes_entries": sum(e["kind"] == "bytes" for e in entries.values()),
        "chunks": len(chunk_keys),
        "storage_entries": storage_entries,
        "stored_bytes": sum(c[4] for c in all_copies),
        "files": len({c[2] for c in all_copies}),
    }
    return mds, entries, files, totals, disagreements


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


class Failed(Exception):
    pass


def require(cond, msg):
    if not cond:
        raise Failed(msg)


def run(binary, *args, ok_codes=(0,)):
    p = subprocess.run([binary, *args], capture_output=True, text=True)
    if p.returncode not in ok_codes:
        said = (p.stderr.strip() or p.stdout.strip())[:800]
        raise Failed(f"`dcpfetch {' '.join(args)}` exited {p.returncode}: {said}")
    return p


def check_ls(binary, path):
    got = json.loads(run(binary, "ls", path, "--json").stdout)
    mds, want, want_files, want_totals, disagreements = expected_listing(path)
    problems = []
    require(got["checkpoint"] == path, f"checkpoint {got['checkpoint']!r} != {path!r}")
    require(got["version"] == want_files[0]["version"], f"version {got['version']!r}")
    require(got["metadata_files"] == want_files, f"metadata_files {got['metadata_files']} != {want_files}")
    got_fqns = [e["fqn"] for e in got["entries"]]
    dup = [f for f, n in collections.Counter(got_fqns).items() if n > 1]
    require(not dup, f"fqns listed twice: {dup[:5]}")
    missing = sorted(set(want) - set(got_fqns))
    extra = sorted(set(got_fqns) - set(want))
    require(not missing and not extra, f"fqns missing {missing[:5]!r}, extra {extra[:5]!r}")
    for e in got["entries"]:
        w = want[e["fqn"]]  # when rank files disagree: the first file's (rank order) values
        for k in ("kind", "dtype", "shape", "strides", "requires_grad"):
            if e[k] != w[k]:
                problems.append(f"{e['fqn']!r}: {k} {e[k]!r} != torch {w[k]!r}")
        copies = collections.Counter(
            (None if c["offsets"] is None else tuple(c["offsets"]), None if c["sizes"] is None else tuple(c["sizes"]),
             c["file"], c["offset"], c["length"], tuple(c["transform_descriptors"]), c["metadata_file"])
            for c in e["chunks"]
        )
        if copies != collections.Counter(w["copies"]):
            problems.append(f"{e['fqn']!r}: stored copies {sorted(copies.elements(), key=repr)} != torch "
                            f"{sorted(w['copies'], key=repr)}")
        if e["stored_bytes"] != sum(c["length"] for c in e["chunks"]):
            problems.append(f"{e['fqn']!r}: stored_bytes {e['stored_bytes']} != sum of chunk lengths")
        if sorted(e["files"]) != sorted({c["file"] for c in e["chunks"]}):
            problems.append(f"{e['fqn']!r}: files {e['files']} != files of its chunks")
    if got["totals"] != want_totals:
        problems.append(f"totals {got['totals']} != {want_totals}")
    require(not problems, "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""))
    note = ""
    for fqn, mname, first, other in disagreements:
        diff = ", ".join(f"{k} {other[k]}" for k in other if other[k] != first[k])
        note += f"; rank files disagree on {fqn!r} ({mname}: {diff}; dcpfetch reports the first file's)"
    warn = f"; warnings: {got['warnings']}" if got["warnings"] else ""
    t = want_totals
    return got, (f"{t['entries']} entries, {t['chunks']} chunks, {t['storage_entries']} storage entries match torch"
                 f"{note}{warn}")


def check_verify(binary, path, tmp):
    p = run(binary, "verify", path, "--json", "--quiet", ok_codes=(0, 1))
    doc = json.loads(p.stdout)
    bad = [c for c in doc["checks"] if c["status"] not in ("pass", "skipped")]
    require(p.returncode == 0 and doc["ok"] and not bad, f"exit {p.returncode}, ok={doc['ok']}: " + "; ".join(
        f"{c['name']} {c['status']} ({len(c['problems'])} problems), first: {c['problems'][:1]}" for c in bad))
    statuses = collections.Counter(c["status"] for c in doc["checks"])
    manifest = os.path.join(tmp, os.path.basename(path) + ".manifest.json")
    run(binary, "verify", path, "--quiet", "--manifest", manifest)
    require(os.path.exists(manifest), "verify --manifest did not write the manifest")
    again = json.loads(run(binary, "verify", path, "--quiet", "--json", "--manifest", manifest).stdout)
    man = [c for c in again["checks"] if c["name"] == "manifest"]
    require(man and man[0]["status"] == "pass", f"manifest check on the second run: {man}")
    skipped = [c["name"] for c in doc["checks"] if c["status"] == "skipped"]
    return (f"{len(doc['checks'])} checks: {statuses['pass']} pass, {statuses['skipped']} skipped "
            f"({', '.join(skipped)}); manifest written and matched")


def glob_regex(glob):
    """An independent reading of docs/selection.md: * ? [set] {a,b} \\x, whole fqn, case-sensitive."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = glob.index("]", i + 2)
            body = glob[i + 1 : j]
            neg = body[:1] in ("!", "^")
            body = body[1:] if neg else body
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = j + 1
            continue
        elif c == "{":
            j = glob.index("}", i)
            out.append("(?:" + "|".join(glob_regex(a).pattern for a in glob[i + 1 : j].split(",")) + ")")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


def expected_selection(fqns, selection):
    sel = [selection[i + 1] for i in range(0, len(selection), 2) if selection[i] == "--select"]
    exc = [selection[i + 1] for i in range(0, len(selection), 2) if selection[i] == "--exclude"]
    chosen = [f for f in fqns if not sel or any(glob_regex(g).fullmatch(f) for g in sel)]
    return sorted(f for f in chosen if not any(glob_regex(g).fullmatch(f) for g in exc))


def template_for(tmd, fqn, custom):
    if isinstance(tmd, BytesStorageMetadata):
        return None
    if custom is not None:
        t = custom(fqn, tmd)
        if t is not None:
            return t
    return torch.zeros(tuple(tmd.size), dtype=tmd.properties.dtype)


def load_selected(folder, fqns, custom):
    """dcp.load of `fqns` from `folder`: {metadata file: state dict}. Per-rank checkpoints are
    loaded once per __N.metadata (each rank's own view), the way check_fetch.py does it."""
    out = {}
    for name in metadata_names(folder):
        reader = FileSystemReader(folder)
        r = rank_of(name)
        md = reader.read_metadata() if r is None else reader.read_metadata(rank=r)
        sd = {f: template_for(md.state_dict_metadata[f], f, custom) for f in fqns if f in md.state_dict_metadata}
        if not sd:
            continue
        if r is not None:
            reader.read_metadata = lambda *a, **k: md  # a single process reads __r.metadata
        dcp.load(sd, storage_reader=reader, no_dist=True)
        out[name] = sd
    return out


def raw_bytes(t):
    """The tensor's elements as bytes, row-major (numpy: bytes(untyped_storage()) is very slow)."""
    if t.is_quantized:
        return (t.int_repr().contiguous().numpy().tobytes(), t.q_scale(), t.q_zero_point())
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and raw_bytes(a) == raw_bytes(b))
    return type(a) is type(b) and a == b


def copied_ranges(mds, fqns):
    ranges = collections.defaultdict(list)
    sel = set(fqns)
    for _, md in mds:
        for idx, si in md.storage_data.items():
            if idx.fqn in sel:
                ranges[si.relative_path].append((si.offset, si.offset + si.length))
    return ranges


def check_sparse_copy(ckpt, out, mds, fqns):
    """Metadata copied byte for byte; shard files of original size, original bytes in the selected
    items, zeros elsewhere; nothing in OUT that the checkpoint does not have."""
    named = {si.relative_path for _, md in mds for si in md.storage_data.values()}
    for name, _ in mds:
        require(open(os.path.join(out, name), "rb").read() == open(os.path.join(ckpt, name), "rb").read(),
                f"{name} not copied byte for byte")
    ours = {n for n in os.listdir(out) if n != ".dcpfetch"}
    require(ours <= set(os.listdir(ckpt)), f"unexpected files in the output: {sorted(ours - set(os.listdir(ckpt)))}")
    ranges = copied_ranges(mds, fqns)
    for name in sorted(named):
        src = np.fromfile(os.path.join(ckpt, name), dtype=np.uint8)
        dst_path = os.path.join(out, name)
        if not os.path.exists(dst_path):
            require(name not in ranges, f"{name} holds selected items but was not written")
            continue
        dst = np.fromfile(dst_path, dtype=np.uint8)
        require(len(src) == len(dst), f"{name}: size {len(dst)} != {len(src)}")
        mask = np.zeros(len(src), dtype=bool)
        for a, b in ranges.get(name, []):
            require(np.array_equal(src[a:b], dst[a:b]), f"{name}: bytes {a}..{b} differ")
            mask[a:b] = True
        stray = int(np.count_nonzero(dst[~mask]))
        require(stray == 0, f"{name}: {stray} bytes outside the selected items are not zero")
    return len(named)


def check_fetch(binary, case, path, selection, extra, tmp):
    mds = torch_metadata(path)
    fqns = sorted({f for _, md in mds for f in md.state_dict_metadata})
    want = expected_selection(fqns, selection)
    sel_json = json.loads(run(binary, "ls", path, "--json", *selection).stdout)
    got = sorted(e["fqn"] for e in sel_json["entries"])
    require(got == want, f"`ls {' '.join(selection)}` selects {len(got)} fqns, the glob {len(want)}: "
            f"only dcpfetch {sorted(set(got) - set(want))[:4]!r}, only glob {sorted(set(want) - set(got))[:4]!r}")
    out = os.path.join(tmp, "out")
    shutil.rmtree(out, ignore_errors=True)
    summary = json.loads(run(binary, "fetch", path, "-o", out, "--quiet", "--json", *selection, *extra).stdout)
    nfiles = check_sparse_copy(path, out, mds, want)  # first: the most precise message
    custom = TEMPLATES.get(case)
    fetched = load_selected(out, want, custom)
    original = load_selected(path, want, custom)
    require(fetched.keys() == original.keys(), f"metadata files {fetched.keys()} != {original.keys()}")
    n = 0
    for mname in original:
        a, b = fetched[mname], original[mname]
        require(a.keys() == b.keys(), f"{mname}: loaded keys differ")
        for k in b:
            require(same(a[k], b[k]), f"{mname}: {k!r} loaded from the copy differs from the original")
            n += 1
    if case == "overwrite":  # the folder must read as the second save
        second = overwrite_second()
        require(all(same(original[".metadata"][k], second[k]) for k in second), "original is not the second save")
    shutil.rmtree(out)
    return (f"{len(want)} fqns, {n} loaded values equal; {summary['items']} items, {summary['requests']} requests, "
            f"{nfiles} shard files sparse-checked")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

SINGLE = {
    "shapes": gen_shapes, "quantized": gen_quantized, "names": gen_names, "large": gen_large,
    "many_tiny": gen_many_tiny, "writer_opts": gen_writer_opts, "sgd_model": gen_sgd_model,
    "overwrite": gen_overwrite,
}


def folder_summary(path):
    files = os.listdir(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    return f"{len(files)} files, {size / 2**20:.2f} MiB"


class Runner:
    def __init__(self, binary, root, scratch):
        self.binary, self.root, self.scratch = binary, root, scratch
        self.results = collections.Counter()

    def log(self, status, name, label, msg, seconds):
        if status in ("ok", "FAIL"):
            self.results[status] += 1
        print(f"{status:<5} {name:<16} {label}: {msg} [{seconds:.2f}s]", flush=True)

    def attempt(self, name, label, fn):
        t0 = time.time()
        try:
            msg, status = fn(), "ok"
        except Failed as e:
            msg, status = str(e), "FAIL"
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if isinstance(e, KeyboardInterrupt):
                raise
            msg, status = f"error: {_first_line(e)}", "FAIL"
            traceback.print_exc(file=sys.stderr)
        self.log(status, name, label, msg, time.time() - t0)
        return status == "ok"

    def check(self, name):
        binary, path, scratch = self.binary, os.path.join(self.root, name), self.scratch
        self.attempt(name, "ls", lambda: check_ls(binary, path)[1])
        self.attempt(name, "verify", lambda: check_verify(binary, path, scratch))
        for sel, extra in CASES[name][2]:
            label = "fetch " + (" ".join(sel) or "(everything)") + (" " + " ".join(extra) if extra else "")
            self.attempt(name, label, lambda sel=sel, extra=extra: check_fetch(binary, name, path, sel, extra, scratch))

    def single(self, name):
        path = os.path.join(self.root, name)

        notes = []

        def gen():
            if name == "dtypes":
                ok, skipped = probe_dtypes(self.scratch)
                notes.extend(skipped)
                gen_dtypes(path, ok)
                return f"{folder_summary(path)}; {len(ok)} dtypes: {' '.join(ok)}"
            SINGLE[name](path)
            return folder_summary(path)

        ok = self.attempt(name, "generate", gen)
        for note in notes:
            print(f"note  {name:<16} not covered: {note}", flush=True)
        if ok:
            self.check(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcpfetch", default=os.path.join(REPO, "target/release/dcpfetch"), metavar="PATH",
                    help="the dcpfetch binary to test (default: target/release/dcpfetch)")
    ap.add_argument("--keep", metavar="DIR", help="write the checkpoints into DIR (new or empty) and keep them")
    ap.add_argument("--only", action="append", choices=list(CASES), metavar="NAME",
                    help=f"run only this checkpoint (repeatable): {', '.join(CASES)}")
    a = ap.parse_args()
    binary = os.path.abspath(a.dcpfetch)
    if not os.access(binary, os.X_OK):
        sys.exit(f"error: {binary} is not an executable (run `cargo build --release` first)")
    names = a.only or list(CASES)
    start = time.time()
    if a.keep:
        if os.path.exists(a.keep) and os.listdir(a.keep):
            sys.exit(f"error: --keep {a.keep}: the folder is not empty")
        os.makedirs(a.keep, exist_ok=True)
        root = os.path.abspath(a.keep)
    else:
        root = tempfile.mkdtemp(prefix="dcpfetch-unseen-")
    scratch = tempfile.mkdtemp(prefix="dcpfetch-unseen-work-")
    r = Runner(binary, root, scratch)
    print(f"dcpfetch {binary}, torch {torch.__version__}, checkpoints in {root}", flush=True)
    try:
        # The multi-rank saves start first, in the background (spawning and importing torch takes
        # most of their time); the single-process checkpoints are written and checked meanwhile.
        groups = collections.defaultdict(list)
        for name in names:
            if CASES[name][0] > 1:
                groups[CASES[name][0]].append(name)
        spawned = []
        for world, jobs in sorted(groups.items()):
            ctx = mp.start_processes(_worker, args=(world, free_port(), root, jobs), nprocs=world, join=False,
                                     start_method="spawn")
            spawned.append((world, jobs, ctx))
        for name in names:
            if CASES[name][0] == 0:
                r.single(name)
        for world, jobs, ctx in spawned:
            t0 = time.time()
            err = None
            try:
                while not ctx.join():
                    pass
            except Exception as e:  # a rank raised or died: its message is in e
                err = str(e).strip().splitlines()[-1][:300]
            waited = time.time() - t0
            for j in jobs:
                path = os.path.join(root, j)
                if err is None:
                    r.log("ok", j, "generate", f"{folder_summary(path)} ({world} ranks, one background spawn for "
                          f"{', '.join(jobs)})", waited)
                    r.check(j)
                else:
                    r.log("FAIL", j, "generate", f"{world}-rank spawn for {', '.join(jobs)} failed: {err}", waited)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    res = r.results
    print(f"summary: {len(names)} checkpoints, {sum(res.values())} checks, {res['ok']} ok, {res['FAIL']} failed; "
          f"{time.time() - start:.1f}s" + (f"; checkpoints kept in {root}" if a.keep else ""), flush=True)
    return 1 if res["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
