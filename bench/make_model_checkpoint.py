"""Writes a model-shaped DCP checkpoint for the fetch benchmarks (needs torch; not committed).

    python3 bench/make_model_checkpoint.py OUT_DIR [--layers 64] [--dim 1024] [--files 4]

The state dict is `layers.{i}.{wq,wk,wv,wo}` float32 DIMxDIM matrices (64 x 4 x 4 MiB = 1 GiB by
default), saved by torch's own `dcp.save` with `FileSystemWriter(thread_count=FILES)`, so the shard
files and `.metadata` are exactly what a real training job writes.
"""

import argparse
import shutil
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    sd = {
        f"layers.{i}.{m}": torch.randn(a.dim, a.dim, generator=g)
        for i in range(a.layers)
        for m in ("wq", "wk", "wv", "wo")
    }
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(a.out, thread_count=a.files))
    print(f"wrote {a.out}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
