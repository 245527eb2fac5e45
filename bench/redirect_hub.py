"""A model hub's `resolve` endpoint, for benchmarks: every GET or HEAD of `/hub/PATH` is answered,
after a delay (the hub's round trip and its time to sign), with a 302 to `TARGET/PATH` (the CDN:
nginx, or the project's S3 test server with `--latency-ms`).

    python3 bench/redirect_hub.py --port 18090 --delay-ms 100 --target http://127.0.0.1:19000/bench/
    dcpfetch fetch http://127.0.0.1:18090/hub/CKPT -o - > /dev/null

No dependencies beyond the standard library; one thread per connection.
"""

import argparse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--delay-ms", type=float, default=100.0)
    ap.add_argument("--target", required=True, help="URL prefix the hub redirects to (ends with /)")
    args = ap.parse_args()
    delay = args.delay_ms / 1000

    class Hub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def redirect(self) -> None:
            time.sleep(delay)
            if not self.path.startswith("/hub/"):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(302)
            self.send_header("Location", args.target + self.path[len("/hub/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = redirect
        do_HEAD = redirect

        def log_message(self, *_args) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", args.port), Hub).serve_forever()


if __name__ == "__main__":
    main()
