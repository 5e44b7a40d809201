"""A real HTTP server (the standard library's) for the update tests: serves a directory with byte ranges, and can
be told to drop the connection after a number of bytes, as a cellular link does."""

from __future__ import annotations

import http.server
import os
import re
import threading
from functools import partial


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "RangeServer._Server"

    def log_message(self, *args) -> None:  # quiet tests
        pass

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = self.translate_path(self.path)
        owner = self.server.owner
        owner.requests.append((self.path, self.headers.get("Range")))
        owner.authorizations.append(self.headers.get("Authorization"))
        if owner.require_authorization is not None and self.headers.get("Authorization") != owner.require_authorization:
            self.send_error(401)
            return
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        ranged = m is not None and self.server.owner.honour_ranges
        if ranged:
            start = int(m.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        budget = self.server.owner.take_drop()
        with open(path, "rb") as f:
            f.seek(start)
            while True:
                data = f.read(16384)
                if not data:
                    return
                if budget is not None:
                    if budget <= 0:
                        self.close_connection = True
                        return  # the connection drops mid-body
                    data = data[:budget]
                    budget -= len(data)
                self.wfile.write(data)


class RangeServer:
    """Serves ``root`` on 127.0.0.1; ``drop_after(n, times)`` cuts the next ``times`` responses after ``n`` bytes.

    Attributes:
        url: ``http://127.0.0.1:<port>/``.
        requests: ``(path, Range header)`` of every request, in order.
        honour_ranges: False makes it answer every request whole, as a server without range support.
        authorizations: The ``Authorization`` header of every request (None when absent), in order.
        require_authorization: When set, a request without exactly this ``Authorization`` header gets 401.
    """

    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: "RangeServer"

    def __init__(self, root: str) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.authorizations: list[str | None] = []
        self.require_authorization: str | None = None
        self.honour_ranges = True
        self._drops: list[int] = []
        self._lock = threading.Lock()
        self._server = self._Server(("127.0.0.1", 0), partial(_Handler, directory=root))
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def drop_after(self, nbytes: int, times: int = 1) -> None:
        with self._lock:
            self._drops += [nbytes] * times

    def take_drop(self) -> int | None:
        with self._lock:
            return self._drops.pop(0) if self._drops else None

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
