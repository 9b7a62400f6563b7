"""``mesh export``: a peer's newest checkpoint as a safetensors file, loadable anywhere without this project.

``safetensors.torch.save_model`` writes the model's tensors (tied weights once: the demo's embedding and output
head share one) with the run id, task, fingerprint, epoch and mesh version in the file's header; no code is ever
in it. The checkpoint is read with ``torch.load(weights_only=True)`` (mesh/checkpoint.py). A model with
``save_pretrained`` (Hugging Face) is also saved that way, in a folder next to the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mesh import __version__, checkpoint
from mesh.config import ExportConfig, parse_task_args
from mesh.errors import ConfigError
from mesh.tasks import load_task

logger = logging.getLogger(__name__)


def run(config: ExportConfig) -> int:
    import safetensors.torch

    assert config.checkpoint_dir is not None and config.out is not None
    try:
        state = checkpoint.load(config.checkpoint_dir)
    except checkpoint.UnreadableCheckpoint as err:
        raise ConfigError(str(err)) from None
    if state is None:
        raise ConfigError(f"no checkpoint in {config.checkpoint_dir} (a peer writes {checkpoint.FILENAME} there with --checkpoint-dir)")
    spec = config.task or state.get("task")
    if not isinstance(spec, str):
        raise ConfigError(f"the checkpoint in {config.checkpoint_dir} does not name its task: pass --task (the run's)")
    task = load_task(spec, parse_task_args(config.task_arg))
    model = task.make_model()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"task {spec!r} builds another model than the checkpoint's ({first}); pass the run's task") from None
    metadata = {
        "run_id": str(state.get("run_id", "")),
        "task": spec,
        "fingerprint": str(state.get("fingerprint", "")),
        "epoch": str(state.get("epoch", "")),
        "mesh_version": __version__,
    }
    out = config.out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        safetensors.torch.save_model(model, str(partial), metadata=metadata)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    pretrained = None
    if callable(getattr(model, "save_pretrained", None)):
        pretrained = out.with_suffix("")
        model.save_pretrained(str(pretrained))
    logger.info(
        "exported run=%s epoch=%s task=%s path=%s bytes=%d%s",
        metadata["run_id"],
        metadata["epoch"],
        spec,
        out,
        Path(out).stat().st_size,
        f" pretrained={pretrained}" if pretrained else "",
    )
    return 0
