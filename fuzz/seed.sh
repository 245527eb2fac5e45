#!/usr/bin/env bash
# Fills fuzz/corpus/<target>/ with seeds cut from the committed fixtures. Idempotent: a seed is
# named by the SHA-1 of its bytes (as libFuzzer names corpus files), so running it again adds
# nothing new. Needs python3 (standard library only).
#
#   unpickler  every fixtures/*/.metadata and __N.metadata, plus the data.pkl of every stored item
#   metadata   every fixtures/*/.metadata and __N.metadata
#   archive    every item's bytes (entries[].chunks[].storage[] and entries[].storage[] of
#              fixtures/expected/*.json) cut from its shard file, and every item's data.pkl, each
#              behind a first byte that picks the piece size (0: one piece, 5: 26-byte pieces)
#   selection  the JSON examples of docs/selection.md and its command-line examples as specs
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import glob, hashlib, io, json, os, re, shlex, zipfile

def put(target, data):
    d = os.path.join("fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, hashlib.sha1(data).hexdigest())
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)

counts = {}
def seed(target, data):
    put(target, data)
    counts[target] = counts.get(target, 0) + 1

# Metadata files.
for path in sorted(glob.glob("fixtures/*/.metadata") + glob.glob("fixtures/*/__*.metadata")):
    data = open(path, "rb").read()
    seed("unpickler", data)
    seed("metadata", data)

# Items cut from the shard files, at the offsets the expected JSON records.
for path in sorted(glob.glob("fixtures/expected/*.json")):
    expected = json.load(open(path))
    if "entries" not in expected:
        continue  # not one checkpoint's description (full_tensors.json: values torch computed)
    folder = os.path.join("fixtures", expected["name"])
    storages = []
    for e in expected["entries"]:
        storages += e.get("storage", [])
        for c in e.get("chunks", []):
            storages += c.get("storage", [])
    for s in storages:
        with open(os.path.join(folder, s["file"]), "rb") as f:
            f.seek(s["offset"])
            item = f.read(s["length"])
        for selector in (0, 5):
            seed("archive", bytes([selector]) + item)
        if item.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(io.BytesIO(item)) as z:
                for name in z.namelist():
                    if name.endswith("/data.pkl"):
                        pkl = z.read(name)
                        seed("unpickler", pkl)
                        seed("archive", b"\0" + pkl)

# Selection specs: the JSON blocks of docs/selection.md, and its `dcpfetch ls` examples as specs.
doc = open("docs/selection.md").read()
for block in re.findall(r"```json\n(.*?)```", doc, re.S):
    seed("selection", block.encode())
for line in re.findall(r"^dcpfetch ls fixtures/model (.*)$", doc, re.M):
    args = shlex.split(line, comments=True)
    spec = {"select": [], "exclude": []}
    for flag, value in zip(args[::2], args[1::2]):
        spec["select" if flag in ("-s", "--select") else "exclude"].append(value)
    seed("selection", json.dumps(spec).encode())

for target, n in sorted(counts.items()):
    unique = len(os.listdir(os.path.join("fuzz", "corpus", target)))
    print(f"{target}: {n} seeds written, {unique} distinct files in fuzz/corpus/{target}")
PY
