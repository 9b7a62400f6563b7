"""The Hugging Face example (mesh/examples/hf_causal_lm.py) on two real peers: they agree and their held-out loss
falls; ``mesh export`` writes a folder that ``transformers`` loads in a fresh Python without mesh, giving the
trained model's logits (reference: the peer's own saved parameters in a model built here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import peer_args
from tests.integration.test_cli_errors import mesh
from tests.integration.test_training import assert_same_parameters, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SPEC = "mesh.examples.hf_causal_lm:make_task"
FRESH = """
import json, sys
import torch
from transformers import GPT2LMHeadModel
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.arange(32).reshape(2, 16)).logits
print(json.dumps({"logits": logits[:, -1, :8].tolist(), "mesh_imported": any(m.split(".")[0] == "mesh" for m in sys.modules)}))
"""


def test_two_peers_train_the_hf_model_and_its_export_loads_with_transformers_alone(bootstrap: str, mesh_procs, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from mesh.tasks import load_task

    common = ("--max-epochs", "4", "--min-peers", "2", "--target-batch-size", "64", "--eval-every", "1")
    peers = [mesh_procs(n, *peer_args(bootstrap, n, tmp_path, *common, task=SPEC)) for n in ("a", "b")]
    for peer in peers:
        assert wait_exit(peer, 240) == 0, peer.output()[-3000:]
    final = assert_same_parameters(*peers)
    held_out = {int(e): float(v) for e, v in re.findall(r"evaluated epoch=(\d+) eval_loss=(\S+)", peers[0].output())}
    assert held_out[4] < held_out[min(held_out)], held_out  # it learned something about unseen bytes
    out = tmp_path / "hf.safetensors"
    result = mesh("export", "--checkpoint-dir", str(tmp_path / "a"), "--out", str(out))
    assert result.returncode == 0 and out.exists() and (tmp_path / "hf" / "config.json").exists(), result.stderr[-2000:]
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "hf")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    got = json.loads(fresh.stdout)
    assert got["mesh_imported"] is False
    model = load_task(SPEC).make_model()
    model.load_state_dict(final, strict=False)  # the tied output head is the embedding
    model.eval()
    with torch.no_grad():
        want = model(input_ids=torch.arange(32).reshape(2, 16)).logits[:, -1, :8]
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=1e-5, atol=1e-5)
