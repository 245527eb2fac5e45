"""One fetch split among 1, 2 and 4 worker processes (`--shard I/N`), as a job array runs it, against
the project's S3 test server with a per-client bandwidth cap: the aggregate throughput per N.

    python3 bench/make_http_bench_checkpoint.py /tmp/shard-bench/ckpt/model     # once, no torch
    cargo build --release --locked && cargo build --release --example s3-test-server
    python3 bench/shard_bench.py --root /tmp/shard-bench --client-bandwidth 40MB --total-bandwidth 120MB

The server serves ROOT (its sub-folders are buckets: the checkpoint above is s3://ckpt/model).
Each worker is its own client: it signs with its own access key (`worker-I`), and the server caps
each key at --client-bandwidth (all its connections together) and everything at
--total-bandwidth, with --latency-ms before every answer. So each worker stands for a machine
with its own link, and the cap, not the cores of the machine running the benchmark, limits it.
For N in --workers, --repeat times (alternating N): the N workers start at once, all writing into
one fresh output folder, and the run ends when the last one exits; the folder is then checked
complete (the metadata published, every shard file the source's size). Aggregate throughput =
the plan's bytes fetched / wall time of the run. The goal: N workers reach at least 0.9 x N times
one worker's throughput, up to the server's total cap (the goal column: 0.9 x the smaller of N
and the total cap over one worker's throughput).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time


def rate(s):
    """Bytes per second from a rate such as 40MB (the server's suffixes)."""
    units = {"": 1, "B": 1, "k": 10**3, "kB": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    digits = len(s) - len(s.lstrip("0123456789"))
    return int(s[:digits]) * units[s[digits:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder whose sub-folders are buckets")
    ap.add_argument("--bucket", default="ckpt")
    ap.add_argument("--prefix", default="model")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--server", default="target/release/examples/s3-test-server")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--client-bandwidth", default="40MB", help="per worker (access key), bytes per second")
    ap.add_argument("--total-bandwidth", default=None, help="over all workers, bytes per second")
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--out", default=None, help="folder for the output folders (default: a temp dir)")
    ap.add_argument("--extra", default="", help="extra dcpfetch fetch arguments, space separated")
    a = ap.parse_args()

    server_cmd = [a.server, "--root", a.root, "--latency-ms", str(a.latency_ms),
                  "--client-bandwidth", a.client_bandwidth]
    if a.total_bandwidth:
        server_cmd += ["--total-bandwidth", a.total_bandwidth]
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, text=True)
    endpoint = server.stdout.readline().split()[-1]
    base_env = dict(os.environ, AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                    AWS_EC2_METADATA_DISABLED="true")
    location = f"s3://{a.bucket}/{a.prefix}"
    s3 = ["--endpoint-url", endpoint, "--path-style"]
    out_root = a.out or tempfile.mkdtemp(prefix="dcpfetch-shard-bench-")
    counts = [int(n) for n in a.workers.split(",")]
    try:
        env = dict(base_env, AWS_ACCESS_KEY_ID="plan")
        plan = json.loads(subprocess.run([a.dcpfetch, "plan", location, "--json", *s3, *a.extra.split()],
                                         check=True, capture_output=True, env=env).stdout)
        fetched = plan["totals"]["bytes_fetched"]
        sizes = {f["file"]: f["size"] for f in plan["files"]}
        print(f"server {endpoint}: per-client cap {a.client_bandwidth}/s, total cap "
              f"{a.total_bandwidth or 'none'}, first-byte latency {a.latency_ms} ms; checkpoint {location}: "
              f"{fetched / 1e6:.0f} MB in {plan['totals']['requests']} requests; output on {out_root}")
        walls = {n: [] for n in counts}
        for _ in range(a.repeat):
            for n in counts:
                out = os.path.join(out_root, f"copy-{n}")
                shutil.rmtree(out, ignore_errors=True)
                started = time.monotonic()
                workers = [subprocess.Popen([a.dcpfetch, "fetch", location, *s3, "-o", out, "--shard", f"{i}/{n}",
                                             "--quiet", *a.extra.split()],
                                            env=dict(base_env, AWS_ACCESS_KEY_ID=f"worker-{i}"))
                           for i in range(n)]
                codes = [w.wait() for w in workers]
                wall = time.monotonic() - started
                if any(codes):
                    raise SystemExit(f"{n} workers: exit codes {codes}")
                if not os.path.exists(os.path.join(out, ".metadata")):
                    raise SystemExit(f"{n} workers: the folder has no metadata")
                for f, size in sizes.items():
                    if os.path.getsize(os.path.join(out, f)) != size:
                        raise SystemExit(f"{n} workers: {f} has the wrong size")
                walls[n].append(wall)
                shutil.rmtree(out, ignore_errors=True)
        one = fetched / statistics.median(walls[counts[0]]) / counts[0]
        # The most N workers can reach: N clients' caps, or the total cap.
        reach = (lambda n: min(n, rate(a.total_bandwidth) / one)) if a.total_bandwidth else (lambda n: n)
        print(f"\n{'workers':>7} {'median s':>9} {'MB/s':>8} {'x one':>6} {'goal':>6}   runs (s)")
        for n in counts:
            wall = statistics.median(walls[n])
            speed = fetched / wall
            print(f"{n:7} {wall:9.2f} {speed / 1e6:8.1f} {speed / one:6.2f} {0.9 * reach(n):6.2f}   "
                  f"{', '.join(f'{w:.2f}' for w in walls[n])}")
    finally:
        server.terminate()
        server.wait()
        if not a.out:
            shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
