"""A loopback HTTP proxy in front of the S3 server that fails each distinct request once.

The first time it sees a request (method, path, query) it answers with an S3 error itself,
alternating 503 SlowDown (throttling) and 500 InternalError, without forwarding it; every
later request goes through to the real server. So every storage call the job makes, of
every kind, has to survive one throttle or server error. With `flaky=False` it fails
nothing and only records the requests it forwards (`forwarded`), to count them.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = [
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
]
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FlakyProxy:
    def __init__(self, upstream: str, *, flaky: bool = True):
        self.upstream = urlsplit(upstream)
        self.flaky = flaky
        self.forwarded: list[tuple[str, str]] = []
        """(method, path with query) of each request passed on to the server, in order."""
        self.seen: set[tuple[str, str]] = set()
        self.injected: dict[int, int] = {503: 0, 500: 0}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                key = (self.command, self.path)
                with proxy.lock:
                    first = proxy.flaky and key not in proxy.seen
                    proxy.seen.add(key)
                    if not first:
                        proxy.forwarded.append(key)
                    if first:
                        status, code, message = ERRORS[sum(proxy.injected.values()) % len(ERRORS)]
                        proxy.injected[status] += 1
                if first:
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers["Host"] = self.headers.get("Host", proxy.upstream.netloc)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                # A HEAD answer has no body but tells the object's size in Content-Length.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        return Handler
