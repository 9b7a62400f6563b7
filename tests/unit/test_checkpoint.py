"""Checkpoints are written atomically: a crash mid-write leaves the previous checkpoint whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mesh import checkpoint
from mesh.errors import ConfigError
from mesh.optimizer import gradients_finite, make_compression, make_optimizer_factory, pick_device, to_device


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    checkpoint.save(tmp_path, state)
    loaded = checkpoint.load(tmp_path)
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temp files left


def test_crash_during_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    checkpoint.save(tmp_path, {"epoch": 1})

    def crash(obj, handle) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]


@pytest.mark.parametrize("content", [b"garbage", b"", b"truncated"], ids=["garbage", "empty", "truncated"])
def test_unreadable_checkpoint_is_moved_aside_not_lost(tmp_path: Path, content: bytes) -> None:
    assert checkpoint.load(tmp_path) is None
    if content == b"truncated":
        checkpoint.save(tmp_path, {"model": {"w": torch.ones(1000)}})
        content = (tmp_path / checkpoint.FILENAME).read_bytes()[:500]
    (tmp_path / checkpoint.FILENAME).write_bytes(content)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="cannot be read") as caught:
        checkpoint.load(tmp_path)
    assert not (tmp_path / checkpoint.FILENAME).exists()
    assert caught.value.moved_to.parent == tmp_path and caught.value.moved_to.read_bytes() == content  # kept as it was
    assert checkpoint.load(tmp_path) is None  # the next start begins without it


def test_checkpoint_holding_something_else_is_unreadable(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / checkpoint.FILENAME)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="not a checkpoint"):
        checkpoint.load(tmp_path)


class _RunsCode:
    """A pickle that runs code when loaded (what a checkpoint from elsewhere could hold)."""

    def __reduce__(self):
        return (Path.touch, (Path(MARKER_DIR[0]) / "code-ran",))


MARKER_DIR: list[str] = []


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    MARKER_DIR[:] = [str(tmp_path)]
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1, "payload": _RunsCode()}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="cannot be read"):
        checkpoint.load(tmp_path)
    assert not (tmp_path / "code-ran").exists()


def test_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        checkpoint.ensure_writable(blocker / "sub")
    assert checkpoint.ensure_writable(tmp_path / "new" / "dir").is_dir()


def test_device_choice() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
        with pytest.raises(ConfigError, match="--device cuda:1 was asked for but torch sees no CUDA device"):
            pick_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_walks_nested_batches() -> None:
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.ones(1)]), "meta": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["meta"] == "kept" and isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)


def test_gradient_check_finds_nan_and_inf() -> None:
    model = torch.nn.Linear(3, 2)
    assert gradients_finite(model)  # no gradients yet
    model(torch.ones(1, 3)).sum().backward()
    assert gradients_finite(model)
    model.bias.grad[0] = float("nan")
    assert not gradients_finite(model)
    model.bias.grad[0] = float("inf")
    assert not gradients_finite(model)
    model.bias.grad[0], model.weight.grad[0, 0] = float("-inf"), float("inf")  # the sum of +inf and -inf is NaN
    assert not gradients_finite(model)
    half = torch.nn.Linear(3, 2).half()
    half.weight.grad = torch.full((2, 3), 60000.0, dtype=torch.float16)  # fp16's sum would overflow; float32's does not
    assert gradients_finite(half)
    half.weight.grad[1, 2] = float("nan")
    assert not gradients_finite(half)


def test_optimizer_and_compression_names() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer_factory("adamw", 0.1)(params), torch.optim.AdamW)
    assert make_optimizer_factory("sgd", 0.1)(params).param_groups[0]["lr"] == 0.1
    with pytest.raises(ConfigError):
        make_optimizer_factory("lamb", 0.1)
    with pytest.raises(ConfigError):
        make_compression("zip")
