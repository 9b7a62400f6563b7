"""A run's config record in the DHT: schema, fingerprint of the task's parameters, publish and fetch.

All runs live under one DHT key, ``mesh_runs``, one subkey per run id, so that anyone holding a DHT can list the
runs. Every DHT of the mesh installs :data:`RUN_RECORD_VALIDATOR`, so a malformed record is refused by the nodes
that would store it, and :func:`fetch_run` drops (and counts) anything that still does not parse.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, TypeVar

import pydantic.v1 as pydantic  # hivemind's DHT schema validation speaks pydantic v1
import torch
from hivemind import DHT
from hivemind.dht.schema import SchemaValidator
from hivemind.utils import get_dht_time

from mesh import __version__
from mesh.config import AVERAGING_MODES, COMPRESSIONS, OPTIMIZERS, RUN_ID_PATTERN

logger = logging.getLogger(__name__)
T = TypeVar("T", bound=pydantic.BaseModel)

RUNS_KEY = "mesh_runs"
RECORD_TTL = 600.0  # seconds a record lives unless a live peer refreshes it
invalid_records_dropped = 0


def _one_of(choices: tuple[str, ...]):
    def check(cls, value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


class RunRecord(pydantic.BaseModel):
    """What every peer of a run must agree on. Published by whoever creates the run."""

    run_id: pydantic.constr(strict=True, regex=RUN_ID_PATTERN.pattern)
    task: pydantic.StrictStr
    fingerprint: pydantic.constr(strict=True, regex=r"^[0-9a-f]{16}$")
    batch_size: pydantic.conint(strict=True, ge=1)
    target_batch_size: pydantic.conint(strict=True, ge=1)
    optimizer: pydantic.StrictStr
    lr: pydantic.confloat(strict=True, gt=0)
    averaging: pydantic.StrictStr
    compression: pydantic.StrictStr
    matchmaking_time: pydantic.confloat(strict=True, gt=0)
    averaging_timeout: pydantic.confloat(strict=True, gt=0)
    average_state_every: pydantic.conint(strict=True, ge=1) = 10
    inner_steps: pydantic.conint(strict=True, ge=1) = 100  # --averaging diloco
    outer_lr: pydantic.confloat(strict=True, gt=0) = 0.7
    outer_momentum: pydantic.confloat(strict=True, ge=0, lt=1) = 0.9
    seed: pydantic.StrictInt
    created_at: pydantic.StrictFloat
    mesh_version: pydantic.StrictStr

    class Config:
        extra = pydantic.Extra.forbid
        allow_mutation = False

    _check_optimizer = pydantic.validator("optimizer", allow_reuse=True)(_one_of(OPTIMIZERS))
    _check_averaging = pydantic.validator("averaging", allow_reuse=True)(_one_of(AVERAGING_MODES))
    _check_compression = pydantic.validator("compression", allow_reuse=True)(_one_of(COMPRESSIONS))

    @pydantic.validator("target_batch_size")
    def _target_at_least_batch(cls, value: int, values: dict[str, Any]) -> int:
        if "batch_size" in values and value < values["batch_size"]:
            raise ValueError("target_batch_size must be >= batch_size")
        return value


class PeerPresence(pydantic.BaseModel):
    """A live peer's short-lived announcement: which run it trains and how far it is. Subkey: its peer id."""

    run_id: pydantic.constr(strict=True, regex=RUN_ID_PATTERN.pattern)
    epoch: pydantic.conint(strict=True, ge=0)
    samples_per_second: pydantic.confloat(strict=True, ge=0)
    loss: pydantic.StrictFloat | None = None
    device: pydantic.StrictStr = ""
    time: pydantic.StrictFloat

    class Config:
        extra = pydantic.Extra.forbid


class _MeshSchema(pydantic.BaseModel):
    mesh_runs: dict[pydantic.StrictStr, RunRecord]
    mesh_peers: dict[pydantic.StrictStr, PeerPresence]


RUN_RECORD_VALIDATOR = SchemaValidator(_MeshSchema, allow_extra_keys=True)
PEERS_KEY = "mesh_peers"
PRESENCE_TTL = 20.0  # seconds; live peers refresh every PRESENCE_TTL / 4


def fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits naming the model's parameter names, shapes and dtypes: peers of one run must agree."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
    return digest.hexdigest()[:16]


def make_record(run_id: str, task: str, model_fingerprint: str, **hyper: Any) -> RunRecord:
    """Build a record, coercing numbers so the strict schema (and msgpack) see the right types."""
    return RunRecord(
        run_id=run_id,
        task=task,
        fingerprint=model_fingerprint,
        batch_size=int(hyper["batch_size"]),
        target_batch_size=int(hyper["target_batch_size"]),
        optimizer=str(hyper["optimizer"]),
        lr=float(hyper["lr"]),
        averaging=str(hyper["averaging"]),
        compression=str(hyper["compression"]),
        matchmaking_time=float(hyper["matchmaking_time"]),
        averaging_timeout=float(hyper["averaging_timeout"]),
        average_state_every=int(hyper.get("average_state_every", 10)),
        inner_steps=int(hyper.get("inner_steps", 100)),
        outer_lr=float(hyper.get("outer_lr", 0.7)),
        outer_momentum=float(hyper.get("outer_momentum", 0.9)),
        seed=int(hyper["seed"]),
        created_at=float(hyper.get("created_at") or time.time()),
        mesh_version=str(hyper.get("mesh_version") or __version__),
    )


def publish_run(dht: DHT, record: RunRecord, ttl: float = RECORD_TTL) -> bool:
    """Store (or refresh) the record; True when at least one DHT node accepted it."""
    stored = dht.store(RUNS_KEY, subkey=record.run_id, value=record.dict(), expiration_time=get_dht_time() + ttl)
    return bool(stored)


def _parse_subkeys(raw: Any, model: type[T], kind: str) -> dict[str, T]:
    """The DHT's dictionary of subkeys as ``model`` objects by subkey, dropping and counting anything malformed."""
    global invalid_records_dropped
    parsed: dict[str, T] = {}
    if raw is None or not isinstance(getattr(raw, "value", None), dict):
        return parsed
    for subkey, item in raw.value.items():
        try:
            parsed[str(subkey)] = model.parse_obj(item.value)
        except (pydantic.ValidationError, ValueError, TypeError) as err:
            invalid_records_dropped += 1
            logger.warning("dropped invalid %s record subkey=%r error=%s", kind, subkey, str(err).replace("\n", " "))
    return parsed


def parse_records(raw: Any) -> dict[str, RunRecord]:
    """Turn the DHT's dictionary of subkeys into run records, dropping and counting anything malformed."""
    global invalid_records_dropped
    records = _parse_subkeys(raw, RunRecord, "run")
    for subkey, record in list(records.items()):
        if record.run_id != subkey:
            invalid_records_dropped += 1
            logger.warning("dropped invalid run record subkey=%r error=subkey does not match run_id %r", subkey, record.run_id)
            del records[subkey]
    return records


def fetch_runs(dht: DHT) -> dict[str, RunRecord]:
    return parse_records(dht.get(RUNS_KEY, latest=True))


def fetch_run(dht: DHT, run_id: str, attempts: int = 3, delay: float = 1.0) -> RunRecord | None:
    """The run's record, or None. Retries a little: a freshly joined node may not see the record at once."""
    for attempt in range(attempts):
        record = fetch_runs(dht).get(run_id)
        if record is not None:
            return record
        if attempt + 1 < attempts:
            time.sleep(delay)
    return None


def announce_peer(dht: DHT, peer_id: str, presence: PeerPresence, ttl: float = PRESENCE_TTL) -> bool:
    return bool(dht.store(PEERS_KEY, subkey=peer_id, value=presence.dict(), expiration_time=get_dht_time() + ttl))


def fetch_peers(dht: DHT, run_id: str | None = None) -> dict[str, PeerPresence]:
    """Live peers (by peer id) announced in the DHT, optionally only those of one run; malformed entries dropped."""
    peers = _parse_subkeys(dht.get(PEERS_KEY, latest=True), PeerPresence, "peer")
    return {peer_id: p for peer_id, p in peers.items() if run_id is None or p.run_id == run_id}
