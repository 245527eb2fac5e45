"""Side by side, in one run: dcpfetch and curl fetching the same bytes from the same S3-protocol server.

    python3 bench/make_model_checkpoint.py /tmp/bench/ckpt/model1g          # once, needs torch
    cargo build --release --example s3-test-server
    python3 bench/fetch_bench.py --root /tmp/bench --bucket ckpt --prefix model1g

The server is the project's test server (tests/support/s3_server.rs) serving ROOT, whose
sub-folders are buckets: the checkpoint above is s3://ckpt/model1g.
For each selection it runs, alternating, `--repeat` times:

- curl: one ranged GET per item (exactly the bytes needed), `--parallel --parallel-max N`, to
  /dev/null. This is the limit of the machine and server for these bytes.
- dcpfetch -o -: the whole pipeline (plan, concurrent parts, item assembly), the stream to /dev/null.
- curl -o files: the same GETs, each written to its own file in the output folder: the reference
  for writing the bytes to that file system.
- dcpfetch -o DIR: the same into a sparse copy on the given output file system.

and prints the median wall time, throughput of needed bytes, ratio to curl, CPU seconds per GiB
(user + system of the client process) and peak RSS. Extra --link-* options shape the link through
the server's knobs (first-byte latency per request, per-connection bandwidth).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

SELECTIONS = {
    "one tenth (layers 0-5)": ["--select", "layers.[0-5].*"],
    "half (every wq and wk)": ["--select", "*.wq", "--select", "*.wk"],
    "everything": [],
}


def run(cmd, stdout=subprocess.DEVNULL, env=None):
    """Runs a command; returns (seconds, cpu seconds, peak RSS MiB)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder whose sub-folders are buckets")
    ap.add_argument("--bucket", default="ckpt")
    ap.add_argument("--prefix", default="model1g")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--server", default="target/release/examples/s3-test-server")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="for both curl and dcpfetch")
    ap.add_argument("--out", default=None, help="folder for the -o DIR runs (default: a temp dir)")
    ap.add_argument("--link-latency-ms", type=int, default=0)
    ap.add_argument("--link-conn-bandwidth", default=None)
    ap.add_argument("--extra", default="", help="extra dcpfetch fetch arguments, space separated")
    a = ap.parse_args()

    server_cmd = [a.server, "--root", a.root]
    if a.link_latency_ms:
        server_cmd += ["--latency-ms", str(a.link_latency_ms)]
    if a.link_conn_bandwidth:
        server_cmd += ["--conn-bandwidth", a.link_conn_bandwidth]
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, text=True)
    endpoint = server.stdout.readline().split()[-1]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    location = f"s3://{a.bucket}/{a.prefix}"
    s3 = ["--endpoint-url", endpoint, "--path-style"]
    out_root = a.out or tempfile.mkdtemp(prefix="dcpfetch-bench-")
    print(f"server {endpoint} serving {a.root}; checkpoint {location}; output folder on {out_root}")
    print(f"link: first-byte latency {a.link_latency_ms} ms, per-connection bandwidth {a.link_conn_bandwidth or 'unlimited'}")
    try:
        for name, sel in SELECTIONS.items():
            listing = json.loads(subprocess.run([a.dcpfetch, "ls", location, "--json", *sel, *s3],
                                                check=True, capture_output=True, env=env).stdout)
            plan = json.loads(subprocess.run([a.dcpfetch, "plan", location, "--json", *sel, *s3, *a.extra.split()],
                                             check=True, capture_output=True, env=env).stdout)["totals"]
            items = [(c["file"], c["offset"], c["length"]) for e in listing["entries"] for c in e["chunks"]]
            needed = sum(length for _, _, length in items)
            # One block per transfer, `next` between them: without it curl applies the last `range`
            # to every URL. Per-transfer options (`fail`, `create-dirs`) go inside each block.
            with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as cfg:
                cfg.write("next\n".join(f'url = "{endpoint}/{a.bucket}/{a.prefix}/{f}"\nrange = "{off}-{off + length - 1}"\n'
                                         f'output = "/dev/null"\nfail\n' for f, off, length in items))
            curl = ["curl", "-s", "--parallel", "--parallel-max", str(a.concurrency), "-K", cfg.name]
            files_dir = os.path.join(out_root, "curl-files")
            with tempfile.NamedTemporaryFile("w", suffix=".curl", delete=False) as cfg_files:
                cfg_files.write("next\n".join(f'url = "{endpoint}/{a.bucket}/{a.prefix}/{f}"\nrange = "{off}-{off + length - 1}"\n'
                                               f'output = "{files_dir}/{i}"\nfail\ncreate-dirs\n'
                                               for i, (f, off, length) in enumerate(items)))
            curl_files = ["curl", "-s", "--parallel", "--parallel-max", str(a.concurrency),
                          "-K", cfg_files.name]
            fetch = [a.dcpfetch, "fetch", location, *sel, *s3, "--quiet", "--concurrency", str(a.concurrency),
                     *a.extra.split()]
            results = {"curl": [], "dcpfetch -o - (null)": [], "curl -o files": [], "dcpfetch -o DIR": []}
            for _ in range(a.repeat):
                results["curl"].append(run(curl, env=env))
                results["dcpfetch -o - (null)"].append(run([*fetch, "-o", "-"], env=env))
                shutil.rmtree(files_dir, ignore_errors=True)
                results["curl -o files"].append(run(curl_files, env=env))
                shutil.rmtree(files_dir, ignore_errors=True)
                out = os.path.join(out_root, "copy")
                shutil.rmtree(out, ignore_errors=True)
                results["dcpfetch -o DIR"].append(run([*fetch, "-o", out], env=env))
                shutil.rmtree(out, ignore_errors=True)
            os.unlink(cfg.name)
            os.unlink(cfg_files.name)
            print(f"\n## {name}: {len(items)} items, {needed / 2**20:.0f} MiB needed "
                  f"({100 * needed / plan['checkpoint_bytes']:.0f}% of the checkpoint); plan: "
                  f"{plan['requests']} requests, {plan['bytes_fetched'] / 2**20:.0f} MiB fetched")
            print(f"{'client':24} {'median s':>9} {'MB/s':>8} {'vs curl':>8} {'CPU s/GiB':>10} {'peak RSS':>9}"
                  "   (-o DIR is compared with curl -o files, -o - with curl to /dev/null)")
            for client, rs in results.items():
                base = statistics.median(w for w, _, _ in results["curl -o files" if "files" in client or "DIR" in client else "curl"])
                wall = statistics.median(w for w, _, _ in rs)
                cpu = statistics.median(c for _, c, _ in rs)
                rss = max(m for _, _, m in rs)
                print(f"{client:24} {wall:9.3f} {needed / wall / 1e6:8.0f} {base / wall:8.2f} "
                      f"{cpu / (needed / 2**30):10.2f} {rss:7.0f}MiB   runs: {', '.join(f'{w:.2f}' for w, _, _ in rs)}")
    finally:
        server.terminate()
        server.wait()
        if not a.out:
            shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
