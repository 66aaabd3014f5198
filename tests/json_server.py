"""Small JSON-over-HTTP(S) servers for the fakes tests stand in for outside APIs (Stripe, Google
Play, an OpenID issuer): a handler base that answers JSON, and a server on a free port."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    def reply(self, status: int, doc) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve(handler: type[JsonHandler], host: str = "127.0.0.1", port: int = 0,
          tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, str]:
    """The server, running in a thread, and its base URL (https when `tls`)."""
    server = ThreadingHTTPServer((host, port), handler)
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}"
