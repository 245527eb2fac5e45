"""Side by side: `dcpfetch verify` (deep) against fetching the same bytes to a null sink.

    python3 bench/verify_bench.py --root /tmp/bench --bucket ckpt --prefix model1g

Both read every item of the checkpoint from the same S3-protocol server (the project's test
server) through the same engine; verify also parses every item's zip structure, combines the
CRC32 of every record and reads every tensor's data.pkl. Prints medians over --repeat runs, the
overhead of verification, CPU seconds per GiB and peak RSS.
"""

import argparse
import os
import statistics
import subprocess
import time


def run(cmd, env):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:2]} failed: {p.stderr.read().decode()}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--bucket", default="ckpt")
    ap.add_argument("--prefix", default="model1g")
    ap.add_argument("--dcpfetch", default="target/release/dcpfetch")
    ap.add_argument("--server", default="target/release/examples/s3-test-server")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    server = subprocess.Popen([a.server, "--root", a.root], stdout=subprocess.PIPE, text=True)
    endpoint = server.stdout.readline().split()[-1]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    loc = f"s3://{a.bucket}/{a.prefix}"
    s3 = ["--endpoint-url", endpoint, "--path-style"]
    total = sum(os.path.getsize(os.path.join(a.root, a.bucket, a.prefix, f))
                for f in os.listdir(os.path.join(a.root, a.bucket, a.prefix)) if f.endswith(".distcp"))
    try:
        clients = {
            "fetch -o - (null)": [a.dcpfetch, "fetch", loc, *s3, "--quiet", "-o", "-"],
            "verify (deep)": [a.dcpfetch, "verify", loc, *s3, "--quiet"],
            "verify --quick": [a.dcpfetch, "verify", loc, *s3, "--quiet", "--quick"],
        }
        results = {k: [] for k in clients}
        for _ in range(a.repeat):
            for k, cmd in clients.items():
                results[k].append(run(cmd, env))
        base = statistics.median(w for w, _, _ in results["fetch -o - (null)"])
        print(f"{loc}: {total / 2**30:.2f} GiB of shard files, {a.repeat} runs each, server {endpoint}")
        print(f"{'client':20} {'median s':>9} {'GB/s':>6} {'vs fetch':>9} {'CPU s/GiB':>10} {'peak RSS':>9}")
        for k, rs in results.items():
            wall = statistics.median(w for w, _, _ in rs)
            cpu = statistics.median(c for _, c, _ in rs)
            rss = max(m for _, _, m in rs)
            print(f"{k:20} {wall:9.3f} {total / wall / 1e9:6.2f} {wall / base:8.2f}x {cpu / (total / 2**30):10.2f} "
                  f"{rss:7.0f}MiB   runs: {', '.join(f'{w:.2f}' for w, _, _ in rs)}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
