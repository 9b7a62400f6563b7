"""A tiny HTTP server for processes without a web app of their own: ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mesh import metrics

logger = logging.getLogger(__name__)


def serve(host: str, port: int, health: Callable[[], dict]) -> ThreadingHTTPServer:
    """Serve in a daemon thread; ``server.server_address[1]`` is the bound port (useful with port 0)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/health"):
                self._reply(200, json.dumps(health()).encode(), "application/json")
            else:
                self._reply(404, json.dumps({"error": {"code": "not_found", "message": path, "details": {}}}).encode(), "application/json")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            # socketserver prints a traceback for any error in a handler; a client that hung up mid-reply (a
            # scrape that timed out) is routine: count it. Anything else: one line, no traceback.
            error = sys.exc_info()[1]
            if isinstance(error, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
                metrics.http_disconnects.inc()
                return
            logger.warning("http request from %s failed: %r", client_address[0], error)

    try:
        server = Server((host, port), Handler)
    except OSError as err:
        from mesh.errors import JoinError

        if err.errno == errno.EADDRINUSE:
            raise JoinError(f"metrics port {port} on {host} is already in use; pick another with --metrics-port (0 = any)") from None
        raise JoinError(f"cannot serve metrics on {host}:{port}: {err.strerror}") from None
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    logger.info("http listening url=http://%s:%d/metrics health=/healthz", host, server.server_address[1])
    return server
