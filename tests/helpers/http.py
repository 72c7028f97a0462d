"""A real HTTP server on 127.0.0.1 serving gzipped IDX files under one path prefix per "mirror"
(and :class:`FailingServer`, an MLflow server that answers HTTP 500).

It can misbehave on request (404, 500, a connection dropped mid-file, a stall) and
records every request. The ``mirrors`` fixture (in conftest.py) starts one per test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.data import gz
from mnistlab.config import DownloadSettings

FAST = DownloadSettings(timeout=5, retries=3, backoff=0)


# A fault decides, from how many times this path was requested before, how to answer:
# None (serve it), "404", "500", "drop" (send Content-Length, then half the body, then
# close), "stall" (say nothing for a while).
Fault = Callable[[int], "str | None"]


class Mirrors:
    """Files served at ``/<mirror>/<name>``; every request's path is recorded."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        mirrors = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with mirrors.lock:
                    seen = mirrors.requests.count(self.path)
                    mirrors.requests.append(self.path)
                fault = mirrors.faults.get(self.path, lambda n: None)(seen)
                body = mirrors.files.get(self.path)
                if fault == "stall":
                    time.sleep(1.5)
                    return
                if body is None or fault in ("404", "500"):
                    self.send_error(500 if fault == "500" else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a client that hung up (timeouts, redirect probes) is not an error worth printing
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, mirror: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mirror}/"

    def publish(self, mirror: str, files: dict[str, bytes]) -> dict[str, bytes]:
        """Serve ``files`` (uncompressed IDX) gzipped under ``mirror``; return name.gz → bytes."""
        served = {f"{name}.gz": gz(blob) for name, blob in files.items()}
        for name, blob in served.items():
            self.files[f"/{mirror}/{name}"] = blob
        return served

    def count(self, prefix: str = "/") -> int:
        with self.lock:
            return sum(r.startswith(prefix) for r in self.requests)


class FailingServer:
    """An "MLflow server" on 127.0.0.1 whose every API call answers HTTP 500 (its database
    broken, say) while ``/health`` answers 200: the stages' reachability probe passes, and
    MLflow's own client meets the failure, with whatever URI (credentials too) it was given."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                if self.path.split("?")[0].rstrip("/").endswith("/health"):
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                else:
                    self.send_error(500)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, userinfo: str = "") -> str:
        """``http://[userinfo@]127.0.0.1:<port>``."""
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
