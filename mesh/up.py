"""``mesh up``: a bootstrap node and N peers on this machine, a live progress view, and a clean stop on Ctrl-C.

Every child runs in its own session (process group), so stopping it also reaches the helpers and libp2p daemons
it started; whatever survives the graceful stop is killed by group. Nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mesh import atomicfile, lifecycle
from mesh.admission import generate_secret
from mesh.config import RunDefaults, UpConfig
from mesh.errors import MeshError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0  # seconds for the bootstrap's address, then for the first peer to start training
STOP_TIMEOUT = 30.0  # seconds each child gets after SIGTERM before it is killed


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, args: list[str], workdir: Path, env: dict[str, str]) -> Child:
    log = workdir / f"{name}.log"
    handle = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: we can reach its daemons even if it dies
    )
    handle.close()
    return Child(name, proc, log)


def _stop(children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every child, wait, then SIGKILL each child's whole process group."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("child did not stop in time, killing name=%s", child.name)
    for child in children:
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.proc.wait()


def _wait_for(path: Path, child: Child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.proc.poll() is not None:
            raise MeshError(f"{child.name} exited with code {child.proc.returncode} before {what}; its log ends:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise MeshError(f"{child.name} did not report {what} within {timeout:.0f}s; see {child.log}")
        time.sleep(0.2)


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peer_args(config: UpConfig, join: str, index: int, workdir: Path, threads: int, api_url: str, metrics_port: int) -> list[str]:
    args = [
        "peer",
        "--join",
        join,
        "--coordinator",
        api_url,
        "--heartbeat-interval",
        "2",
        "--metrics-port",
        str(metrics_port),
        "--run",
        config.run,
        "--task",
        config.task,
        *(arg for item in config.task_arg for arg in ("--task-arg", item)),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        config.device,
        "--threads",
        str(threads),
        "--log-level",
        config.log_level,
        "--min-peers",
        str(config.peers),
        "--status-file",
        str(workdir / f"peer-{index}.json"),
        "--checkpoint-dir",
        str(workdir / f"peer-{index}"),
        "--identity",
        str(workdir / f"peer-{index}.key"),
    ]
    # every run setting mesh up was given (it creates the run through its first peer): none dropped on the way
    for field in dataclasses.fields(RunDefaults):
        value = getattr(config, field.name)
        if value is not None:
            args += ["--" + field.name.replace("_", "-"), str(value)]
    if config.max_epochs is not None:
        args += ["--max-epochs", str(config.max_epochs)]
    return args


class View:
    """Redraws a small table on a terminal; elsewhere prints one line per new epoch."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.drawn = 0
        self.last_epoch = -1

    def render(self, statuses: list[tuple[str, dict, bool]]) -> None:
        epochs = [s.get("epoch", 0) for _, s, _ in statuses if s]
        epoch = max(epochs, default=0)
        if self.tty:
            lines = [f"{'peer':<8} {'state':<9} {'epoch':>5} {'loss':>8} {'samples/s':>10} {'group':>5} {'rounds ok/failed':>17}"]
            for name, s, alive in statuses:
                rounds = s.get("rounds", {})
                state = s.get("state", "starting") if alive else "exited"
                lines.append(
                    f"{name:<8} {state:<9} {s.get('epoch', 0):>5} {s.get('loss', float('nan')):>8.4f} "
                    f"{s.get('global_samples_per_second', 0.0):>10.1f} {s.get('last_group_size', 0):>5} "
                    f"{rounds.get('ok', 0):>8}/{rounds.get('failed', 0):<8}"
                )
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self.drawn = len(lines)
        elif epoch > self.last_epoch and epochs:
            self.last_epoch = epoch
            losses = [s["loss"] for _, s, _ in statuses if s and s.get("loss") == s.get("loss") and "loss" in s]
            loss = sum(losses) / len(losses) if losses else float("nan")
            rate = max((s.get("global_samples_per_second", 0.0) for _, s, _ in statuses if s), default=0.0)
            group = max((s.get("last_group_size", 0) for _, s, _ in statuses if s), default=0)
            alive = sum(1 for _, _, a in statuses if a)
            print(
                f"epoch={epoch} loss={loss:.4f} global_samples_per_second={rate:.1f} last_group={group} peers_running={alive}",
                file=self.stream,
                flush=True,
            )


def averaging_mode(config: UpConfig) -> str:
    """The run's averaging mode as the banner names it (with DiLoCo's settings)."""
    if config.averaging != "diloco":
        return config.averaging
    return f"diloco(inner_steps={config.inner_steps},outer_lr={config.outer_lr},outer_momentum={config.outer_momentum})"


def run(config: UpConfig) -> int:
    stop = lifecycle.install_stop_handlers()
    workdir = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix="mesh-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [*workdir.glob("peer-*.json"), *workdir.glob("peer-*.tmp")]:  # only our own status files
        stale.unlink()
    (workdir / "bootstrap.addr").unlink(missing_ok=True)
    threads = config.threads_per_peer or max(1, (os.cpu_count() or 1) // config.peers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env.pop("MESH_CONFIG", None)
    env.pop("MESH_RUN_SECRET", None)
    # the run's credential (docs/security.md): given, or a new one; the peers get it in their environment (a flag
    # would show in `ps`), and it is written where another terminal can read it to join
    secret = None if config.open_run else (config.run_secret or generate_secret())
    secret_file = workdir / "run.secret"
    secret_file.unlink(missing_ok=True)
    if secret is not None:
        atomicfile.write(secret_file, secret + "\n", mode=0o600)
    peer_env = {**env, "MESH_RUN_SECRET": secret} if secret is not None else env
    children: list[Child] = []
    exit_code = 0
    try:
        metrics_ports = {"bootstrap": free_port(), **{f"peer-{i}": free_port() for i in range(config.peers)}}
        bootstrap = _spawn(
            "bootstrap",
            [
                "bootstrap",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--address-file",
                str(workdir / "bootstrap.addr"),
                "--metrics-port",
                str(metrics_ports["bootstrap"]),
                "--identity",
                str(workdir / "bootstrap.key"),
                "--log-level",
                config.log_level,
            ],
            workdir,
            env,
        )
        children.append(bootstrap)
        _wait_for(workdir / "bootstrap.addr", bootstrap, STARTUP_TIMEOUT, "its address")
        join = (workdir / "bootstrap.addr").read_text().split()[0]
        print(f"mesh up: bootstrap at {join}", flush=True)
        (workdir / "api.url").unlink(missing_ok=True)
        api = _spawn(
            "coordinator",
            [
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(config.api_port),
                "--db-path",
                str(workdir / "coordinator.db"),
                "--bootstrap",
                join,
                "--address-file",
                str(workdir / "api.url"),
                "--heartbeat-interval",
                "2",
                "--log-level",
                config.log_level,
            ],
            workdir,
            env,
        )
        children.append(api)
        _wait_for(workdir / "api.url", api, STARTUP_TIMEOUT, "its address")
        api_url = (workdir / "api.url").read_text().strip()
        print(f"mesh up: coordinator (embedded store) at {api_url}; status page: {api_url}/", flush=True)
        where = [f"{name}=http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()]
        print("mesh up: metrics " + " ".join([*where, f"coordinator={api_url}/metrics"]), flush=True)
        print(
            f"mesh up: {config.peers} peer(s) training task={config.task} run={config.run} averaging={averaging_mode(config)} "
            f"{'open (no secret)' if secret is None else 'protected'}; "
            f"logs in {workdir}",
            flush=True,
        )
        credential = f"MESH_RUN_SECRET=$(cat {secret_file}) " if secret is not None else ""
        print(f"mesh up: join from another terminal with: {credential}mesh peer --join {join} --run {config.run}", flush=True)
        peers = []
        for index in range(config.peers):
            args = _peer_args(config, join, index, workdir, threads, api_url, metrics_ports[f"peer-{index}"])
            peer = _spawn(f"peer-{index}", args, workdir, peer_env)
            children.append(peer)
            peers.append(peer)
            if index == 0:  # the first peer creates the run; the others then join it instead of racing to create
                _wait_for(workdir / "peer-0.json", peer, STARTUP_TIMEOUT, "that it is training")
        view = View()
        reported: set[str] = set()
        while not stop.is_set():
            statuses = [(p.name, _read_status(workdir / f"{p.name}.json"), p.proc.poll() is None) for p in peers]
            view.render(statuses)
            for peer in peers:
                code = peer.proc.poll()
                if code not in (None, 0) and peer.name not in reported:
                    reported.add(peer.name)
                    exit_code = 1
                    print(f"mesh up: {peer.name} exited with code {code}; its log ends:\n{peer.tail()}", file=sys.stderr, flush=True)
            if all(p.proc.poll() is not None for p in peers):
                break
            if api.proc.poll() is not None:
                print(f"mesh up: the coordinator exited with code {api.proc.returncode}:\n{api.tail()}", file=sys.stderr)
                exit_code = 1
                break
            if bootstrap.proc.poll() is not None:
                print(f"mesh up: the bootstrap exited with code {bootstrap.proc.returncode}:\n{bootstrap.tail()}", file=sys.stderr)
                exit_code = 1
                break
            stop.wait(1.0)
        if stop.is_set():
            print("mesh up: stopping (Ctrl-C again to force)", flush=True)
    finally:
        _stop(list(reversed(children)))
    codes = {c.name: c.proc.returncode for c in children}
    print("mesh up: stopped " + " ".join(f"{name}={code}" for name, code in codes.items()), flush=True)
    if not config.workdir and exit_code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return exit_code
