"""Writes a training-shaped DCP checkpoint WITHOUT torch, for bench/vs_curl.py on machines
where torch cannot be installed.

    python3 bench/make_http_bench_checkpoint.py OUT_DIR [--layers 3] [--dim 1024] [--files 4]

The `.metadata` pickle has the opcodes torch's `dcp.save` writes (checked against
fixtures/model/.metadata): the classes are stand-ins registered under torch's module names, so the
pickle names `torch.distributed.checkpoint.metadata.Metadata` etc. exactly as torch does. Per layer:
`model.layers.{i}.attn.{wq,wk,wv,wo}.weight` (DIMxDIM), `model.layers.{i}.mlp.{w1,w2}.weight`
(4DIMxDIM, DIMx4DIM) and, for each, `optim.state.layers.{i}...exp_avg` and `...exp_avg_sq`: float32,
one chunk each, random bytes in a stored zip laid out like torch.save's, spread round-robin over
FILES shard files (3 layers, dim 1024 is
about 430 MiB).
"""

import argparse
import dataclasses
import io
import os
import pickle
import shutil
import sys
import types
import uuid
import zipfile


def module(name):
    m = types.ModuleType(name)
    sys.modules[name] = m
    return m


torch = module("torch")
serialization = module("torch.serialization")
module("torch.distributed")
module("torch.distributed.checkpoint")
md = module("torch.distributed.checkpoint.metadata")
fs = module("torch.distributed.checkpoint.filesystem")


def place(obj, mod, name):
    obj.__module__ = mod.__name__
    obj.__qualname__ = obj.__name__ = name
    setattr(mod, name, obj)
    return obj


class Size(tuple):
    def __reduce__(self):
        return (Size, (tuple(self),))


place(Size, torch, "Size")


class DType:
    def __reduce__(self):
        return "float32"


DType.__module__ = "torch"
torch.float32 = DType()


def _get_layout(name):
    return name


place(_get_layout, serialization, "_get_layout")


class Layout:
    def __reduce__(self):
        return (_get_layout, ("torch.strided",))


class _MEM_FORMAT_ENCODING:
    def __init__(self, v):
        self.v = v

    def __reduce__(self):
        return (_MEM_FORMAT_ENCODING, (self.v,))


place(_MEM_FORMAT_ENCODING, md, "_MEM_FORMAT_ENCODING")


class TensorProperties:
    def __init__(self, stride):
        self.stride = stride

    def __getstate__(self):
        return (torch.float32, Layout(), False, _MEM_FORMAT_ENCODING(0), False, self.stride)


place(TensorProperties, md, "TensorProperties")


def dataclass(mod, name, *fields):
    cls = dataclasses.make_dataclass(name, fields, eq=False)
    return place(cls, mod, name)


ChunkStorageMetadata = dataclass(md, "ChunkStorageMetadata", "offsets", "sizes")
TensorStorageMetadata = dataclass(md, "TensorStorageMetadata", "properties", "size", "chunks")
MetadataIndex = dataclass(md, "MetadataIndex", "fqn", "offset", "index")
StorageMeta = dataclass(md, "StorageMeta", "checkpoint_id", "save_id", "load_id", "modules")
Metadata = dataclass(md, "Metadata", "state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")
_StorageInfo = dataclass(fs, "_StorageInfo", "relative_path", "offset", "length")


def archive(data):
    """A stored (uncompressed) zip laid out like a torch.save archive around the raw bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(None, protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", data)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/.data/serialization_id", uuid.uuid4().hex * 8)
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    d, h = a.dim, 4 * a.dim
    shapes = []
    for i in range(a.layers):
        for m, shape in [("attn.wq", (d, d)), ("attn.wk", (d, d)), ("attn.wv", (d, d)), ("attn.wo", (d, d)), ("mlp.w1", (h, d)), ("mlp.w2", (d, h))]:
            shapes.append((f"model.layers.{i}.{m}.weight", shape))
            for s in ["exp_avg", "exp_avg_sq"]:
                shapes.append((f"optim.state.layers.{i}.{m}.weight.{s}", shape))
    files = [open(os.path.join(a.out, f"__{k}_0.distcp"), "wb") for k in range(a.files)]
    sdm, storage = {}, {}
    for n, (fqn, (r, c)) in enumerate(shapes):
        f = files[n % a.files]
        offset = f.tell()
        f.write(archive(os.urandom(r * c * 4)))
        length = f.tell() - offset
        zero = Size((0, 0))
        sdm[fqn] = TensorStorageMetadata(TensorProperties((c, 1)), Size((r, c)), [ChunkStorageMetadata(zero, Size((r, c)))])
        storage[MetadataIndex(fqn, zero, 0)] = _StorageInfo(os.path.basename(f.name), offset, length)
    for f in files:
        f.close()
    meta = Metadata(sdm, {}, storage, StorageMeta(None, str(uuid.uuid4()), None, []), "1.0.0")
    with open(os.path.join(a.out, ".metadata"), "wb") as f:
        pickle.dump(meta, f, protocol=4)


if __name__ == "__main__":
    main()
