"""A user's own training loop on the library API (``python -m mesh.examples.own_loop``), as real processes on
127.0.0.1: two copies and a late joiner agree on their parameters, learn as well as the same loop in one process at
the same global batch, and one asked to leave (SIGTERM) does so within the bound while the others go on."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from mesh.data import Batches, PeerSampler
from mesh.examples import own_loop
from tests.integration.test_cli_errors import mesh
from tests.integration.test_training import assert_same_parameters, wait_exit
from tests.procs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

EPOCHS, TARGET, SHUTDOWN = 16, 2048, 15
LOOP = "mesh.examples.own_loop"


def loop_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    """``mesh peer``'s settings of the tests (tests/conftest.py peer_args), as the MESH_* variables a script reads."""
    settings = {
        "host": "127.0.0.1",
        "port": "0",
        "status_file": str(tmp_path / f"{name}.json"),
        "checkpoint_dir": str(tmp_path / name),
        "matchmaking_time": "1",
        "averaging_timeout": "10",
        "log_every": "2",
        "threads": "1",
        "target_batch_size": str(TARGET),
        "min_step_time": "0.05",  # a step of this small model takes ~1 ms: a real one's would take longer
        "eval_every": "1",
        "shutdown_timeout": str(SHUTDOWN),
        **extra,
    }
    return {f"MESH_{key.upper()}": value for key, value in settings.items()}


def single_process_held_out_loss(epochs: int) -> float:
    """The same loop in one process at the same global batch: each epoch one AdamW step on the mean gradient of
    TARGET samples, clipped at 1, the same schedule and the run's start (seed 0)."""
    torch.manual_seed(0)
    model = own_loop.make_model()
    optimizer = own_loop.make_optimizer()(own_loop.param_groups(model))
    scheduler = own_loop.warmup_cosine()(optimizer)
    data = own_loop.train_set()
    loader = Batches(torch.utils.data.DataLoader(data, batch_size=TARGET, sampler=PeerSampler(data, 1)), "reference")
    for _ in range(epochs):
        optimizer.zero_grad()
        own_loop.loss_fn(model, next(loader)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return own_loop.evaluate(model)


def test_own_loop_copies_and_a_late_joiner_agree_learn_and_leave_within_the_bound(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    args = ("--join", bootstrap, "--run", "own")
    start = {n: mesh_procs(n, *args, module=LOOP, env=loop_env(tmp_path, n, max_epochs=str(EPOCHS), min_peers="2")) for n in "ab"}
    leaver = mesh_procs("leaver", *args, module=LOOP, env=loop_env(tmp_path, "leaver", min_peers="2"))
    start["a"].wait_epoch(2, timeout=180)
    late = mesh_procs("late", *args, module=LOOP, env=loop_env(tmp_path, "late", max_epochs=str(EPOCHS)))
    start["a"].wait_epoch(5, timeout=120)
    leaver.remember_descendants()
    asked = time.monotonic()
    leaver.proc.send_signal(signal.SIGTERM)  # while the others train on
    bound = 2 * (1 + 10) + SHUTDOWN + 6  # a step in a gradient and a parameter round, the leave, reaping (as for mesh peer)
    assert wait_exit(leaver, bound + 10) == 0, leaver.output()[-3000:]
    assert time.monotonic() - asked < bound
    status = leaver.status()
    assert status["state"] == "left", status
    saved = torch.load(leaver.checkpoint_dir / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == status["epoch"] >= 5  # its final checkpoint: nothing it trained is lost
    assert start["a"].status()["epoch"] < EPOCHS  # the others were still training
    for peer in (*start.values(), late):
        assert wait_exit(peer, 240) == 0, peer.output()[-3000:]
    assert re.search(r"loaded state from peers", late.output()), late.output()[-3000:]  # it came late: took the run's state
    assert all(peer.status()["epoch"] == EPOCHS for peer in (*start.values(), late))
    final = assert_same_parameters(*start.values(), late)
    # the loop's checkpoints name its task (own_loop.task): mesh export builds the model from it
    out = tmp_path / "own.safetensors"
    exported = mesh("export", "--checkpoint-dir", str(start["a"].checkpoint_dir), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert_close(safetensors.torch.load_file(str(out)), final, rtol=0, atol=0)
    reference = single_process_held_out_loss(EPOCHS)
    initial = (torch.manual_seed(0), own_loop.evaluate(own_loop.make_model()))[1]
    for peer in (*start.values(), late):
        held_out = peer.status()["eval_loss"]  # of the parameters it ended with (evaluated at its last epoch)
        assert held_out < 0.5 * initial, (peer.name, held_out, initial)
        assert held_out < 1.25 * reference, (peer.name, held_out, reference)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--task-arg", "width=3"], "unexpected keyword argument 'width'"),
        (["--task-arg", "hidden"], "--task-arg must be KEY=VALUE"),
    ],
)
def test_own_loop_mistakes_get_one_line(argv: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, "-m", LOOP, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
