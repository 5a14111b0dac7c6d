"""An http server for a prepared dataset that honours Range requests and breaks on purpose (test-only).

`faults` maps a shard name to how many of its next requests are cut off half-way (the
headers promise the whole range, half the body is sent, then the connection is closed, as
a dropped transfer looks to curl (exit 18) or urllib); -1 cuts every request.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start, end = int(first), int(last) + 1 if last else len(data)
        body = data[start:end]
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Length", str(len(body)))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        with server.lock:
            server.requests[path.name] = server.requests.get(path.name, 0) + 1
            left = server.faults.get(path.name, 0)
            if left:
                server.faults[path.name] = left - 1 if left > 0 else left
        if left:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(root: Path, faults: dict[str, int]) -> tuple[ThreadingHTTPServer, str]:
    """(server, base URL); call server.shutdown() when done."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.root, server.faults, server.requests, server.lock = Path(root), dict(faults), {}, threading.Lock()
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
