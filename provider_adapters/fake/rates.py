"""A fake ECB rate server: the euro reference rates in the ECB's own XML format.

``GET /stats/eurofxref/eurofxref-daily.xml`` answers a ``gesmes:Envelope`` as the ECB
publishes it (``Cube`` / ``Cube time="YYYY-MM-DD"`` / ``Cube currency="USD"
rate="1.0876"``), for the day and rates currently set. ``POST /_fake/rates`` with
``{"date": "2026-12-04", "rates": {"USD": "1.0876", ...}}`` sets them (rates are strings:
exact decimals), ``POST /_fake/fail`` with ``{"status": 503}`` makes the next GETs fail
(``{"status": null}`` to stop), and ``GET /_fake/hits`` counts the GETs served.

Standard library only, served from a thread (:class:`FakeRateServer`), so a test, the
demo or a synchronous command can fetch from it without an event loop of its own.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import quoteattr

__all__ = ["DAILY_PATH", "DEFAULT_RATES", "FakeRateServer", "ecb_daily_xml"]

DAILY_PATH = "/stats/eurofxref/eurofxref-daily.xml"
# A plausible day of ECB reference rates (1 EUR = rate units), as strings.
DEFAULT_RATES = {
    "USD": "1.0876",
    "JPY": "161.23",
    "GBP": "0.85715",
    "CHF": "0.9412",
    "KWD": "0.33471",
    "ISK": "150.90",
}


def ecb_daily_xml(day: str, rates: dict[str, str]) -> bytes:
    """The ECB's daily document for ``day`` with ``rates``, byte for byte in its layout."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01" '
        'xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref">',
        "\t<gesmes:subject>Reference rates</gesmes:subject>",
        "\t<gesmes:Sender>",
        "\t\t<gesmes:name>European Central Bank</gesmes:name>",
        "\t</gesmes:Sender>",
        "\t<Cube>",
        f"\t\t<Cube time={quoteattr(day)}>",
        *(
            f"\t\t\t<Cube currency={quoteattr(code)} rate={quoteattr(rate)}/>"
            for code, rate in rates.items()
        ),
        "\t\t</Cube>",
        "\t</Cube>",
        "</gesmes:Envelope>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


class FakeRateServer:
    """The fake on 127.0.0.1 and a free port (``port=0``), in a daemon thread."""

    def __init__(self, day: str, rates: dict[str, str] | None = None, port: int = 0) -> None:
        self.day = day
        self.rates = dict(DEFAULT_RATES if rates is None else rates)
        self.fail_status: int | None = None
        self.hits = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{DAILY_PATH}"

    def set_rates(self, day: str, rates: dict[str, str]) -> None:
        with self._lock:
            self.day, self.rates = day, dict(rates)

    def __enter__(self) -> FakeRateServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: tests read hits, not logs

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/_fake/hits":
                    self._reply(200, json.dumps({"hits": fake.hits}).encode(), "application/json")
                    return
                if self.path != DAILY_PATH:
                    self._reply(404, b"not found", "text/plain")
                    return
                with fake._lock:
                    fake.hits += 1
                    failing, day, rates = fake.fail_status, fake.day, dict(fake.rates)
                if failing is not None:
                    self._reply(failing, b"unavailable", "text/plain")
                    return
                self._reply(200, ecb_daily_xml(day, rates), "text/xml")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/_fake/rates":
                    fake.set_rates(
                        str(body["date"]), {str(k): str(v) for k, v in body["rates"].items()}
                    )
                elif self.path == "/_fake/fail":
                    with fake._lock:
                        fake.fail_status = body.get("status")
                else:
                    self._reply(404, b"not found", "text/plain")
                    return
                self._reply(204, b"", "text/plain")

        return Handler
