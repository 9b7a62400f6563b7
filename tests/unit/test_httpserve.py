"""The metrics/health server of the peer and the bootstrap: clients that hang up cost a count, never a traceback."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request

from mesh import httpserve, metrics


def _hang_up_mid_request(port: int) -> None:
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset, as a timeout does
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: scraper\r\n\r\n")
    client.close()


def test_client_that_hangs_up_is_counted_without_a_traceback(capsys) -> None:
    server = httpserve.serve("127.0.0.1", 0, lambda: {"status": "ok"})
    port = server.server_address[1]
    before = metrics.http_disconnects._value.get()
    try:
        for _ in range(30):
            _hang_up_mid_request(port)
        deadline = time.monotonic() + 5
        while metrics.http_disconnects._value.get() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:  # still serving
            assert json.loads(reply.read()) == {"status": "ok"}
    finally:
        server.shutdown()
        server.server_close()
    assert metrics.http_disconnects._value.get() > before
    assert "Traceback" not in capsys.readouterr().err
