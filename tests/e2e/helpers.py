"""What the end-to-end tests share beyond the harnesses in tests/ (envoy_harness, http_client,
shim_harness, ngx_wasm_harness): traffic helpers and a slow upstream. Fixtures are in
tests/e2e/conftest.py."""

import http.server
import threading
import time

from http_client import request


def statuses(envoy, n, path="/v1/search", headers=None):
    """`n` sequential requests through the gateway; their statuses."""
    return [request(envoy.port, path, headers).status for _ in range(n)]


class SlowUpstream:
    """An HTTP upstream that holds each request for `delay_s`, to keep requests in flight."""

    def __init__(self, delay_s):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
