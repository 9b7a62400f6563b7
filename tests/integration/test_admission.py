"""Run admission with real processes on 127.0.0.1 (docs/security.md): an outsider with plain hivemind cannot touch a
protected run, a wrong or missing secret gets one line, and the run's record cannot be forged.

References: the attacked peers' parameters must equal each other and learn within 2x of a clean run (single-process
SGD on the same global batch, the worst of five data seeds, as ``test_two_peers_agree_and_learn_like_a_single_process``
computes it); the record a new peer trains by is the one the run was created with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import peer_args
from tests.integration.test_training import assert_same_parameters, eval_loss, reference_eval_loss, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "s3cret-of-the-test-run-0123456789"
EPOCHS = 24


def test_an_outsider_with_plain_hivemind_is_refused_on_every_path(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    env = {"MESH_RUN_SECRET": SECRET}
    extra = ("--max-epochs", str(EPOCHS), "--min-peers", "2", "--average-state-every", "4")
    honest = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *extra), env=env) for n in ("a", "b")]
    honest[0].wait_epoch(1)
    rogue = mesh_procs("rogue", bootstrap, "test", "25", module="tests.integration.rogue")
    # the late joiner comes after the forged records: it must still read the run's own, and take the state
    # meanwhile, peers with a wrong secret and with none: one line each, exit 4
    outsiders = [
        (mesh_procs(name, *peer_args(bootstrap, name, tmp_path, task=None), env=env), message)
        for name, env, message in (
            ("wrong", {"MESH_RUN_SECRET": "another-secret-of-16-chars"}, "this --run-secret is not its secret"),
            ("none", {}, "is protected: pass its secret with --run-secret or MESH_RUN_SECRET"),
        )
    ]
    rogue.wait_for(lambda: "forged and probed" in rogue.output(), 60, "the forgeries and probes")
    late = mesh_procs("c", *peer_args(bootstrap, "c", tmp_path, "--max-epochs", str(EPOCHS), task=None), env=env)
    for outsider, message in outsiders:
        assert wait_exit(outsider, 60) == 4, outsider.output()[-3000:]
        errors = [line for line in outsider.output().splitlines() if line.startswith("mesh peer: error:")]
        assert len(errors) == 1 and message in errors[0], outsider.output()[-3000:]
        assert "Traceback" not in outsider.output()
    assert wait_exit(rogue, 120) == 0, rogue.output()[-3000:]
    report = json.loads(next(line for line in rogue.output().splitlines() if line.startswith("{")))
    for peer in (*honest, late):
        assert wait_exit(peer, 200) == 0, peer.output()[-3000:]

    # the attacker saw the run and its peers, and got nothing from them
    assert report["records"]["copies_seen"] >= 1 and report["peers_seen"] >= 2, report
    assert report["records"]["overwrites_accepted"] == 0, report  # no node stored its copy over a peer's own
    assert all(codes == ["PROTOCOL_VIOLATION"] for codes in report["probes"]["join"]), report
    assert all(parts == 0 for parts in report["probes"]["download"]), report
    # the peers it tried counted and logged the refusals; the forged records were dropped and counted
    refused = [peer.status()["refused"] for peer in (*honest, late)]
    assert sum(r["unadmitted"] for r in refused) >= 2 * len(honest), refused
    assert sum(r["record"] for r in refused) >= 1, refused
    assert all(r["state"] == 0 and r["ticket"] == 0 and r["group"] == 0 for r in refused), refused
    assert "refused reason=unadmitted" in honest[0].output()
    # the late joiner read the record the run was created with, not the forged one, and took the state
    assert re.search(r"joined run run=test .* lr=0\.2 protected=True", late.output()), late.output()[-3000:]
    assert late.status()["state_downloads"] >= 1, late.status()

    final = assert_same_parameters(*honest, late)
    # within 2x of single-process SGD's worst of five seeds, as the clipped test below (an attack that got through,
    # a forged state or gradient, ends orders of magnitude off: the mean test's huge gradients > 100x). Not 1.5x: with
    # four more processes on 2 cores the honest peers fall behind and download state (b 2-3 times, c 3-6 times) and
    # reached 1.18-1.61x of that worst seed in three runs here and one fresh-clone CI run (1.5x failed two of the four)
    references = [reference_eval_loss(EPOCHS, seed) for seed in range(5)]
    rounds = [(status["rounds"], status["state_downloads"]) for status in (peer.status() for peer in (*honest, late))]
    assert eval_loss(final) <= 2 * max(references), (eval_loss(final), references, rounds)


@pytest.mark.parametrize("aggregation", ["clipped", "mean"])
def test_clipped_aggregation_bounds_an_admitted_peer_sending_huge_gradients(
    aggregation: str, bootstrap: str, mesh_procs, tmp_path: Path
) -> None:
    """One of three admitted peers multiplies its gradients by 1e4. Clipped: the two honest peers learn within 2x
    of what a clean run must reach (single-process SGD's worst of five data seeds). Mean: the same attack ruins
    them (so this test can fail)."""
    epochs = 8 if aggregation == "clipped" else 3
    common = ("--max-epochs", str(epochs), "--min-peers", "3", "--aggregation", aggregation)
    env = {"MESH_RUN_SECRET": SECRET}
    peers = [
        mesh_procs(name, *peer_args(bootstrap, name, tmp_path, *common, *extra), env=env)
        for name, extra in (("a", ()), ("b", ()), ("faulty", ("--fault-gradient-scale", "1e4")))
    ]
    for peer in peers:
        assert wait_exit(peer, 200) == 0, peer.output()[-3000:]
    honest = peers[:2]
    final = honest[0].load_parameters()
    references = [reference_eval_loss(epochs, seed) for seed in range(5)]
    loss = eval_loss(final) if all(torch.isfinite(t).all() for t in final.values()) else float("inf")
    if aggregation == "clipped":
        assert_same_parameters(*honest)
        assert loss <= 2 * max(references), (loss, references)
        assert sum(peer.status()["clipped_outliers"] for peer in peers) >= epochs, [p.status() for p in peers]
        assert all(peer.status()["rounds"]["ok"] >= epochs - 1 for peer in honest), [p.status() for p in honest]
    else:
        assert loss > 100 * max(references), (loss, references)


def test_two_runs_with_different_secrets_on_one_dht_never_average_together(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """Two protected runs, two peers each, on one bootstrap at the same time: each pair averages only with itself
    (a group of four would make all four parameters equal), and neither refuses anything: they never even meet."""
    runs = {"x": ("x1", "x2"), "y": ("y1", "y2")}
    peers = {
        run: [
            mesh_procs(
                name,
                *peer_args(bootstrap, name, tmp_path, "--max-epochs", "4", "--min-peers", "2", run=run),
                env={"MESH_RUN_SECRET": f"{run}-secret-0123456789"},
            )
            for name in names
        ]
        for run, names in runs.items()
    }
    for pair in peers.values():
        for peer in pair:
            assert wait_exit(peer, 200) == 0, peer.output()[-3000:]
    finals = {run: assert_same_parameters(*pair) for run, pair in peers.items()}
    assert not torch.allclose(finals["x"]["weight"], finals["y"]["weight"])
    for pair in peers.values():
        for peer in pair:
            status = peer.status()
            assert status["last_group_size"] == 2 and status["rounds"]["ok"] >= 3, status
            assert sum(status["refused"].values()) == 0, status
