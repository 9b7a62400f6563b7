"""``mesh export``: a run's model as a safetensors file, loadable anywhere without this project: a peer's newest
checkpoint (``--checkpoint-dir``), or the newest state of the live mesh (``--join ADDR --run RUN``).

``safetensors.torch.save_model`` writes the model's tensors (tied weights once: the demo's embedding and output
head share one) with the run id, task, fingerprint, epoch and mesh version in the file's header; no code is ever
in it. The checkpoint is read with ``torch.load(weights_only=True)`` (mesh/checkpoint.py). A model with
``save_pretrained`` (Hugging Face) is also saved that way, in a folder next to the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mesh import __version__, checkpoint
from mesh.admitted import AdmittedAverager
from mesh.averager import MeshStateAverager
from mesh.config import ExportConfig, parse_task_args
from mesh.errors import ConfigError, RunError
from mesh.tasks import load_task

logger = logging.getLogger(__name__)


def run(config: ExportConfig) -> int:
    if config.checkpoint_dir is not None:
        model, metadata = from_checkpoint(config)
    else:
        model, metadata = from_mesh(config)
    write(model, {**metadata, "mesh_version": __version__}, config)
    return 0


def from_checkpoint(config: ExportConfig) -> tuple[torch.nn.Module, dict[str, str]]:
    """The model of the newest checkpoint in ``--checkpoint-dir``, and the header's metadata."""
    assert config.checkpoint_dir is not None
    try:
        state = checkpoint.load(config.checkpoint_dir)
    except checkpoint.UnreadableCheckpoint as err:
        raise ConfigError(str(err)) from None
    if state is None:
        raise ConfigError(f"no checkpoint in {config.checkpoint_dir} (a peer writes {checkpoint.FILENAME} there with --checkpoint-dir)")
    spec = config.task or state.get("task")
    if not isinstance(spec, str):
        raise ConfigError(f"the checkpoint in {config.checkpoint_dir} does not name its task: pass --task (the run's)")
    model = load_task(spec, parse_task_args(config.task_arg)).make_model()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"task {spec!r} builds another model than the checkpoint's ({first}); pass the run's task") from None
    return model, {
        "run_id": str(state.get("run_id", "")),
        "task": spec,
        "fingerprint": str(state.get("fingerprint", "")),
        "epoch": str(state.get("epoch", "")),
    }


def from_mesh(config: ExportConfig) -> tuple[torch.nn.Module, dict[str, str]]:
    """The run's newest state, downloaded from a live peer: this process joins the DHT as a client, reads the run's
    record, builds the model from its task and takes the parameters hivemind's state averagers serve to joiners
    (the same download a late joiner makes; a protected run's MAC checked). It never trains nor averages."""
    from mesh import lifecycle
    from mesh.admission import Admission
    from mesh.dht import start_dht
    from mesh.records import announce_peer, fetch_run, fingerprint
    from mesh.runs import starting_presence

    assert config.run is not None
    admission = Admission(config.run, config.run_secret)
    dht = start_dht(dataclasses.replace(config, client_mode=True))
    try:
        record = fetch_run(dht, config.run, admission=admission)
        if record is None:
            raise RunError(f"run {config.run!r} does not exist in this mesh (no live peer publishes it); check the run id")
        spec = config.task or record.task
        task = load_task(spec, parse_task_args(config.task_arg))
        torch.manual_seed(record.seed)
        model = task.make_model()
        if fingerprint(model) != record.fingerprint:
            raise RunError(f"task {spec!r} builds another model than run {record.run_id!r} trains; pass the run's --task-arg")
        # the order in which the peers' optimizer holds the parameters, which is the order their state is served in
        groups = task.param_groups(model) if task.param_groups is not None else [{"params": list(model.parameters())}]
        params = [param for group in groups for param in group["params"]]
        if admission.protected:  # a protected run's peers serve their state only to a signed presence
            announce_peer(dht, str(dht.peer_id), starting_presence(record.run_id, "export"), admission=admission)
        reader = StateReader(
            [param.detach().clone() for param in params],
            dht,
            prefix=f"{admission.namespace}_state_averager",
            client_mode=True,
            start=True,
            admission=admission,
        )
        try:
            loaded = reader.load_state_from_peers(timeout=config.state_timeout)
        finally:
            reader.shutdown()
        if loaded is None:
            raise RunError(
                f"no live peer of run {record.run_id!r} served its state within {config.state_timeout:g}s; "
                "export from a peer's --checkpoint-dir instead"
            )
        state_metadata, tensors = loaded
        if len(tensors) < len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
            raise RunError(f"the state peers of run {record.run_id!r} served does not fit task {spec!r}'s model")
        with torch.no_grad():
            for param, tensor in zip(params, tensors):
                param.copy_(tensor)
        epoch = state_metadata.get("epoch") if isinstance(state_metadata, dict) else None
        logger.info("state downloaded run=%s epoch=%s", record.run_id, epoch)
        return model, {"run_id": record.run_id, "task": spec, "fingerprint": record.fingerprint, "epoch": str(epoch)}
    finally:
        dht.shutdown()
        lifecycle.kill_descendants()


class StateReader(AdmittedAverager):
    """A client of the run's state averagers that only downloads their state (it never averages nor serves)."""

    @classmethod
    def get_stub(cls, p2p: Any, peer: Any, *, namespace: str | None = None) -> Any:
        # hivemind names an RPC by the serving class (``prefix::MeshStateAverager.rpc_download_state``)
        return MeshStateAverager.get_stub(p2p, peer, namespace=namespace)


def write(model: torch.nn.Module, metadata: dict[str, str], config: ExportConfig) -> None:
    import safetensors.torch

    out = config.out
    assert out is not None
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
        metadata["task"],
        out,
        Path(out).stat().st_size,
        f" pretrained={pretrained}" if pretrained else "",
    )
