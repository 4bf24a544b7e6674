"""A loopback HTTP server answering every GET with a body a test computes per request.

For tests that need a rank's /metrics (or anything else on a port) without a trainer behind it:
recorded expositions, a counter the test flips, a web page where a rank should be.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


class ServedText:
    """Serves `body()` on 127.0.0.1 at a free port (`address`) until `close()`."""

    def __init__(self, body: Callable[[], str], content_type: str = PROMETHEUS_TEXT) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                data = body().encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        # close() waits for serve_forever's next poll: 0.5 s by default, at every teardown
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
