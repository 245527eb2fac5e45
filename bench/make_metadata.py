"""Writes a checkpoint whose .metadata has N storage entries, for the metadata parsing benchmark.

The Metadata object is built from torch's own DCP classes and pickled the way torch's
FileSystemWriter does (`pickle.dump` of `Metadata`); shard files are sparse files of the right size
(their bytes are zeros: the benchmark measures metadata handling only), or, with `--archives`,
files in which every item is a real `torch.save` archive of its chunk (zeros), so that `fetch` and
`verify` run their whole path on it. Needs torch.

    python3 bench/make_metadata.py OUT_DIR --tensors 10000 --chunks 100   # 1,000,000 entries
    # the two shapes of bench/scale_bench.py: one chunk per tensor, and FSDP's 100 ranks
    python3 bench/make_metadata.py OUT --tensors 1000000 --chunks 1 --files 64 --rows 1 --cols 4 --archives
    python3 bench/make_metadata.py OUT --tensors 10000 --chunks 100 --files 100 --rows 1 --cols 4 --archives
"""

import argparse
import io
import os
import pickle

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--chunks", type=int, default=100, help="chunks per tensor (rows of 8)")
    ap.add_argument("--files", type=int, default=64, help="chunk c of tensor t goes to file (t * chunks + c) %% files")
    ap.add_argument("--rows", type=int, default=8, help="rows of each chunk")
    ap.add_argument("--cols", type=int, default=256, help="columns of every tensor")
    ap.add_argument("--archives", action="store_true", help="write every item as a torch.save archive")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows, cols = a.rows * a.chunks, a.cols
    archive = io.BytesIO()
    torch.save(torch.zeros(a.rows, cols), archive)
    archive = archive.getvalue()
    item_len = len(archive)
    sdm, storage = {}, {}
    offsets = [0] * a.files
    for t in range(a.tensors):
        fqn = f"model.layers.{t // 8}.block.{t % 8}.weight"
        props = TensorProperties(dtype=torch.float32)
        chunks = []
        for c in range(a.chunks):
            off, size = torch.Size([a.rows * c, 0]), torch.Size([a.rows, cols])
            chunks.append(ChunkStorageMetadata(offsets=off, sizes=size))
            f = (t * a.chunks + c) % a.files
            storage[MetadataIndex(fqn, off)] = _StorageInfo(f"__{f}_0.distcp", offsets[f], item_len)
            offsets[f] += item_len
        sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size([rows, cols]), chunks=chunks)
    md = Metadata(state_dict_metadata=sdm, storage_data=storage, planner_data=None)
    md.storage_meta = StorageMeta(checkpoint_id=a.out, save_id="bench", load_id=None)
    with open(os.path.join(a.out, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    for i, size in enumerate(offsets):
        with open(os.path.join(a.out, f"__{i}_0.distcp"), "wb") as f:
            if a.archives:
                block = archive * 4096
                for _ in range(size // len(block)):
                    f.write(block)
                f.write(archive * (size % len(block) // item_len))
            else:
                f.truncate(size)
    print(f"{a.out}: {len(storage)} storage entries, .metadata {os.path.getsize(os.path.join(a.out, '.metadata'))} bytes")


if __name__ == "__main__":
    main()
