"""Every user mistake gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import peer_args
from tests.procs import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # real processes: minutes, not the default 60 s

VALID_ID = "12D3KooWSB3L5TWVTFUmLUg2LRtbYVZtYCjmsACqFCiXUvLF9sJ8"


def mesh(*args: str, timeout: float = 90, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mesh ARGS`` in its own process group; on timeout the whole group is killed."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mesh {' '.join(args)} did not finish in {timeout}s:\n{out}\n{err}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers it may have left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_malformed_multiaddr() -> None:
    result = mesh("peer", "--join", "127.0.0.1:31337", "--run", "r", "--task", "regression")
    assert_one_line_error(result, 3, "invalid multiaddr '127.0.0.1:31337'", "/ip4/HOST/tcp/PORT/p2p/PEERID")


def test_bootstrap_that_does_not_answer() -> None:
    started = time.monotonic()
    result = mesh(
        "peer",
        "--join",
        f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{VALID_ID}",
        "--run",
        "r",
        "--task",
        "regression",
        "--host",
        "127.0.0.1",
        "--join-timeout",
        "3",
    )
    assert_one_line_error(result, 3, "nobody answered", "within 3s", "mesh doctor")
    assert time.monotonic() - started < 60


def test_join_url_with_no_bootstrap_behind_it() -> None:
    port = free_port()
    result = mesh(
        "peer",
        "--join",
        f"http://127.0.0.1:{port}/healthz",
        "--run",
        "r",
        "--task",
        "regression",
        "--host",
        "127.0.0.1",
        "--join-timeout",
        "2",
    )
    assert_one_line_error(result, 3, f"could not read the bootstrap's addresses from http://127.0.0.1:{port}/healthz within 2s")


def test_unknown_task_name() -> None:
    result = mesh("peer", "--run", "r", "--task", "resnet9000")
    assert_one_line_error(result, 2, "resnet9000")


def test_task_argument_the_task_does_not_take() -> None:
    result = mesh("peer", "--run", "r", "--task", "mesh.examples.user_task:make_task", "--task-arg", "depth=3")
    assert_one_line_error(result, 2, "unexpected keyword argument 'depth'", "it takes: hidden")
    result = mesh("peer", "--run", "r", "--task", "demo", "--task-arg", "no-equals-sign")
    assert_one_line_error(result, 2, "--task-arg must be KEY=VALUE")


def test_unknown_tracker() -> None:
    assert_one_line_error(mesh("peer", "--run", "r", "--tracker", "mlflow"), 2, "--tracker must be one of csv, tensorboard, wandb")


def test_invalid_flag_value() -> None:
    result = mesh("peer", "--run", "r", "--compression", "zip")
    assert_one_line_error(result, 2, "--compression must be one of none, fp16, 8bit")


def test_checkpoint_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = mesh("peer", "--run", "r", "--task", "regression", "--checkpoint-dir", str(blocker / "ckpt"))
    assert_one_line_error(result, 2, "checkpoint directory", "is not writable")


def test_port_already_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = mesh("bootstrap", "--host", "127.0.0.1", "--port", str(port))
    assert_one_line_error(result, 3, f"port {port} on 127.0.0.1 is already in use")


def test_coordinator_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = mesh("api", "--host", "127.0.0.1", "--port", str(port), "--db-path", str(tmp_path / "c.db"))
    assert_one_line_error(result, 3, f"port {port} on 127.0.0.1 is already in use")


def test_bad_mongo_url_and_coordinator_flags() -> None:
    assert_one_line_error(mesh("api", "--mongo-url", "postgres://x"), 2, "--mongo-url must start with mongodb://")
    assert_one_line_error(mesh("peer", "--run", "r", "--coordinator", "ftp://x"), 2, "--coordinator must be an http")
    assert_one_line_error(mesh("peer", "--run", "auto", "--task", "regression"), 2, "--run auto needs --coordinator")


def test_more_bad_inputs_get_one_line(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("this is not a database " * 100)
    assert_one_line_error(mesh("api", "--port", "0", "--db-path", str(not_a_db)), 2, "cannot use --db-path")
    assert_one_line_error(mesh("api", "--port", "0", "--mongo-url", "mongodb://h:99999"), 2, "--mongo-url is not usable")
    assert_one_line_error(mesh("peer", "--run", "r", "--config", str(tmp_path)), 2, "cannot be read")
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = mesh("peer", "--run", "r", "--task", "regression", "--metrics-port", str(port))
    assert_one_line_error(result, 3, f"port {port}", "already in use")


def test_run_nobody_created(bootstrap: str, tmp_path: Path) -> None:
    result = mesh(*peer_args(bootstrap, "p", tmp_path, run="no-such-run", task=None))
    assert_one_line_error(result, 4, "run 'no-such-run' does not exist", "--task")


def test_task_differs_from_the_run(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    first = mesh_procs("a", *peer_args(bootstrap, "a", tmp_path))
    first.wait_for(lambda: first.status(), 90, "training")
    result = mesh(*peer_args(bootstrap, "b", tmp_path, task="demo"))
    assert_one_line_error(result, 4, "run 'test' trains task 'regression', not 'demo'")


def test_fingerprint_mismatch(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """Same task spec, different code on the two machines: the shapes differ, so the late peer refuses."""
    module = tmp_path / "mytask.py"
    template = (
        "import torch\nfrom mesh.tasks import Task\n"
        "def make():\n"
        "    def batches(bs, seed):\n"
        "        g = torch.Generator().manual_seed(seed)\n"
        "        while True:\n"
        "            x = torch.randn(bs, 4, generator=g)\n"
        "            yield x, x[:, :1]\n"
        "    return Task('mine', lambda: torch.nn.Linear(4, {out}), batches, lambda m, b: (m(b[0])[:, :1] - b[1]).pow(2).mean(),"
        " defaults={{'lr': 0.1, 'optimizer': 'sgd'}})\n"
    )
    module.write_text(template.format(out=1))
    env = {"PYTHONPATH": str(tmp_path)}
    first = mesh_procs("a", *peer_args(bootstrap, "a", tmp_path, task="mytask:make"), env=env)
    first.wait_for(lambda: first.status(), 90, "training")
    module.write_text(template.format(out=3))
    result = mesh(*peer_args(bootstrap, "b", tmp_path, task="mytask:make"), env=env)
    assert_one_line_error(result, 4, "fingerprint", "expects")
