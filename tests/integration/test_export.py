"""``mesh export`` (mesh/export.py): a real peer's checkpoint as safetensors, loaded in a fresh Python that never
imports mesh (plain torch builds the regression task's ``Linear(16, 4)``) and giving the trained model's outputs
(reference: the peer's own saved parameters); the demo's tied weights survive; mistakes get one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mesh.runs import model_fingerprint
from mesh.tasks import load_task
from tests.conftest import peer_args
from tests.integration.test_cli_errors import assert_one_line_error, mesh
from tests.integration.test_training import wait_exit
from tests.procs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FRESH = """
import json, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_model
model = torch.nn.Linear(16, 4)
load_model(model, sys.argv[1])
with safe_open(sys.argv[1], "pt") as f:
    header = f.metadata()
x = torch.linspace(-1, 1, 32).reshape(2, 16)
print(json.dumps({"out": model(x).tolist(), "header": header, "mesh_imported": any(m.split(".")[0] == "mesh" for m in sys.modules)}))
"""


def test_an_exported_checkpoint_loads_without_mesh_and_gives_the_trained_models_outputs(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    peer = mesh_procs("a", *peer_args(bootstrap, "a", tmp_path, "--max-epochs", "2"))
    assert wait_exit(peer, 120) == 0, peer.output()[-3000:]
    out = tmp_path / "exported" / "model.safetensors"
    result = mesh("export", "--checkpoint-dir", str(tmp_path / "a"), "--out", str(out))
    assert result.returncode == 0 and out.exists(), result.stderr[-2000:]
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    got = json.loads(fresh.stdout)
    assert got["mesh_imported"] is False
    trained = torch.nn.Linear(16, 4)
    trained.load_state_dict(peer.load_parameters())
    with torch.no_grad():
        want = trained(torch.linspace(-1, 1, 32).reshape(2, 16))
    torch.testing.assert_close(torch.tensor(got["out"]), want, rtol=0, atol=0)
    header = got["header"]
    assert header["run_id"] == "test" and header["task"] == "regression" and header["epoch"] == "2"
    assert header["fingerprint"] == model_fingerprint(load_task("regression"), 0)  # the run's (seed 0)


def test_the_demo_models_tied_weights_survive_the_export(tmp_path: Path) -> None:
    from safetensors.torch import load_model

    from mesh import checkpoint

    task = load_task("demo")
    torch.manual_seed(3)
    model = task.make_model()
    (tmp_path / "ckpt").mkdir()
    checkpoint.save(tmp_path / "ckpt", {"run_id": "r", "task": "demo", "fingerprint": "0" * 16, "epoch": 7, "model": model.state_dict()})
    out = tmp_path / "demo.safetensors"
    result = mesh("export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    again = task.make_model()
    load_model(again, str(out))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.lm_head.weight.data_ptr() == again.tok_emb.weight.data_ptr()  # still one tensor


def test_export_mistakes_get_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "m.safetensors")
    assert_one_line_error(mesh("export", "--checkpoint-dir", str(tmp_path), "--out", out), 2, "no checkpoint in")
    from mesh import checkpoint

    checkpoint.save(tmp_path, {"run_id": "r", "model": torch.nn.Linear(16, 4).state_dict()})
    result = mesh("export", "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "m.safetensors"))
    assert_one_line_error(result, 2, "does not name its task: pass --task")
    result = mesh("export", "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "m.safetensors"), "--task", "demo")
    assert_one_line_error(result, 2, "task 'demo' builds another model than the checkpoint's")
    assert not (tmp_path / "m.safetensors").exists() and REPO.exists()
    assert_one_line_error(mesh("export", "--out", out), 2, "give --checkpoint-dir DIR")
    assert_one_line_error(mesh("export", "--join", "/ip4/127.0.0.1/tcp/1/p2p/x", "--out", out), 2, "--join needs --run")


SECRET = "export-test-secret-0123456789"


def test_export_from_the_live_mesh_gives_the_runs_newest_parameters(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    """``mesh export --join ADDR --run RUN``: the state a late joiner would download, from a protected run's live
    peers (reference: a peer's own checkpoint of the exported epoch; epochs take ~4 s, so one is caught between two)."""
    common = ("--min-peers", "2", "--checkpoint-every", "1", "--min-step-time", "0.5")
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *common), env={"MESH_RUN_SECRET": SECRET}) for n in ("a", "b")]
    peers[0].wait_epoch(2, timeout=180)
    out = tmp_path / "live.safetensors"
    for _attempt in range(3):
        result = mesh(
            "export", "--join", bootstrap, "--run", "test", "--host", "127.0.0.1", "--out", str(out), env={"MESH_RUN_SECRET": SECRET}
        )
        assert result.returncode == 0, result.stderr[-3000:]
        saved = torch.load(peers[0].checkpoint_dir / "checkpoint.pt", weights_only=True)
        with safe_open(str(out), "pt") as exported:
            header, tensors = exported.metadata(), {name: exported.get_tensor(name) for name in exported.keys()}
        if header["epoch"] == str(saved["epoch"]):
            break
    assert header["epoch"] == str(saved["epoch"]) and saved["epoch"] >= 2, (header, saved["epoch"])
    assert header["run_id"] == "test" and header["task"] == "regression"
    torch.testing.assert_close(tensors, saved["model"], rtol=0, atol=0)
    refused = mesh("export", "--join", bootstrap, "--run", "test", "--host", "127.0.0.1", "--out", str(tmp_path / "no.safetensors"))
    assert_one_line_error(refused, 4, "is protected: pass its secret")
    assert not (tmp_path / "no.safetensors").exists()
