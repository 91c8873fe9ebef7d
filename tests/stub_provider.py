"""A leaky provider for redaction tests: it answers every POST with a 400 whose message
echoes the caller's Authorization header and a card number, as a careless provider might.
Runs in a thread of the test process; records the headers it received."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LeakyProvider:
    def __init__(self, card: str) -> None:
        self.card = card
        self.requests: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                owner.requests.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps(
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "code": "parameter_invalid",
                            "message": f"card {owner.card} refused for "
                            f"{self.headers.get('Authorization')}",
                        }
                    }
                ).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
