"""Writes a training-shaped DCP checkpoint (model + Adam state) for the side-by-side benchmark (needs torch).

    python3 bench/make_training_checkpoint.py OUT_DIR            # ~2 GiB: 14 layers, dim 1024, hidden 4096
    python3 bench/make_training_checkpoint.py OUT_DIR --small    # ~100 MB: 11 layers, dim 256, hidden 1024

The model is a real nn.Module whose layers are `layers.{i}.attn.{wq,wk,wv,wo}` (DIMxDIM) and
`layers.{i}.mlp.{w1,w2}` (HIDDENxDIM, DIMxHIDDEN) float32 linear maps without bias. After one Adam
step (random gradients), `torch.distributed.checkpoint.state_dict.get_state_dict` gives the model and
optimizer state dicts, saved as `{"model": ..., "optim": ...}` by torch's own `dcp.save` with
`FileSystemWriter(thread_count=FILES)`, so the fqns, shard files and `.metadata` are exactly what a
training job writes: `model.layers.0.attn.wq.weight`, `optim.state.layers.0.attn.wq.weight.exp_avg`,
`...exp_avg_sq`, `...step` (0-dim tensors) and `optim.param_groups.0.lr`, `...betas`, `...params`, ...
(bytes entries). The model is a third of the bytes, the optimizer two thirds.
"""

import argparse
import os
import shutil
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

PRESETS = {
    "default": {"layers": 14, "dim": 1024, "hidden": 4096},  # 14 x 48 MiB = 672 MiB model, 2016 MiB in all
    "small": {"layers": 11, "dim": 256, "hidden": 1024},  # 11 x 3 MiB = 33 MiB model, 99 MiB in all
}


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.attn = Attn(dim)
        self.mlp = Mlp(dim, hidden)


class Model(nn.Module):
    def __init__(self, layers, dim, hidden):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(layers))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true", help="the ~100 MB preset, for quick checks")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None, help="MLP hidden size (default 4 x dim)")
    ap.add_argument("--files", type=int, default=4, help="shard files (FileSystemWriter thread_count)")
    a = ap.parse_args()
    p = dict(PRESETS["small" if a.small else "default"])
    if a.layers is not None:
        p["layers"] = a.layers
    if a.dim is not None:
        p["dim"] = a.dim
        p["hidden"] = 4 * a.dim
    if a.hidden is not None:
        p["hidden"] = a.hidden

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Model(**p)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for prm in model.parameters():
        prm.grad = torch.randn(prm.shape, generator=g)
    opt.step()
    for prm in model.parameters():
        prm.grad = None
    model_sd, optim_sd = get_state_dict(model, opt)

    shutil.rmtree(a.out, ignore_errors=True)
    dcp.save({"model": model_sd, "optim": optim_sd},
             storage_writer=dcp.FileSystemWriter(a.out, thread_count=a.files))
    n_params = sum(prm.numel() for prm in model.parameters())
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {a.out}: {p['layers']} layers, dim {p['dim']}, hidden {p['hidden']}, "
          f"{n_params / 1e6:.1f}M parameters, {total / 2**20:.0f} MiB in {len(os.listdir(a.out))} files")


if __name__ == "__main__":
    main()
