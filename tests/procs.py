"""Real mesh processes for tests: each in its own process group, reaped (daemons included) at teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import torch

from mesh.up import free_port  # noqa: F401  (shared with the tests)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class MeshProcess:
    name: str
    proc: subprocess.Popen
    log: Path
    workdir: Path
    descendants: set[int] = field(default_factory=set)

    @property
    def status_file(self) -> Path:
        return self.workdir / f"{self.name}.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / self.name

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def remember_descendants(self) -> set[int]:
        """Record the pids below this process (hivemind helpers, p2pd), to check later that none survive."""
        try:
            self.descendants |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        return self.descendants

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before {what}:\n{self.output()[-3000:]}")
            time.sleep(poll)
        raise AssertionError(f"{self.name}: no {what} within {timeout}s:\n{self.output()[-3000:]}")

    def wait_epoch(self, epoch: int, timeout: float = 120.0) -> dict:
        return self.wait_for(lambda: (s := self.status()) and s.get("epoch", 0) >= epoch and s, timeout, f"epoch {epoch}")

    def load_parameters(self) -> dict[str, torch.Tensor]:
        state = torch.load(self.checkpoint_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        return state["model"]


def spawn(name: str, args: list[str], workdir: Path, env: dict | None = None, module: str = "mesh") -> MeshProcess:
    """``python -m MODULE ARGS`` (the mesh's CLI by default) in its own session, its output in WORKDIR/NAME.log."""
    log = workdir / f"{name}.log"
    handle = open(log, "wb")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if not (k.startswith("MESH_") and k not in (env or {}))}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        start_new_session=True,
    )
    handle.close()
    return MeshProcess(name, proc, log, workdir)


def reap(process: MeshProcess) -> None:
    """Kill the process group and every descendant we ever saw."""
    process.remember_descendants()
    try:
        os.killpg(process.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in process.descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.add(pid)
        except psutil.NoSuchProcess:
            pass
    return living


def promtool_check_metrics(url: str) -> str:
    """Fetch a /metrics page and run ``promtool check metrics`` on it; returns the page."""
    body = urllib.request.urlopen(url, timeout=10).read()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (url, result.stdout.decode() + result.stderr.decode())
    return body.decode()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"no {what} within {timeout}s")


@contextmanager
def http_server(replies: list[tuple[int, bytes]], seen: list[str] | None = None):
    """A tiny HTTP server on 127.0.0.1:0 answering every GET with the next of ``replies`` (the last one repeats);
    yields its base URL and records the paths asked in ``seen``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if seen is not None:
                seen.append(self.path)
            status, body = replies.pop(0) if len(replies) > 1 else replies[0]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def metric(page: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` in a Prometheus text page whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def metrics_page(port: int) -> str:
    """The /metrics page a process serves on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()
