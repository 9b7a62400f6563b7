"""A run's config record in the DHT: schema, fingerprint of the task's parameters, publish and fetch.

All runs live under one DHT key, ``mesh_runs``, one subkey per run id, so that anyone holding a DHT can list the
runs. Every DHT of the mesh installs :data:`RUN_RECORD_VALIDATOR`, so a malformed record is refused by the nodes
that would store it, and :func:`fetch_run` drops (and counts) anything that still does not parse.

A protected run's records (:mod:`mesh.admission`) are signed twice: each peer writes its own copy under a subkey
that names its RSA public key (``RUN[owner:ssh-rsa ...]``; hivemind's :class:`RSASignatureValidator`, installed on
every mesh node, refuses a write to such a subkey not signed by that key, so nobody can overwrite another peer's
copy, however late its expiration), and each copy carries an HMAC of its content under the run's key, so that only
holders of the run's secret can write a copy that readers accept. Presence records work the same way
(``PEERID[owner:...]``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, TypeVar

import pydantic.v1 as pydantic  # hivemind's DHT schema validation speaks pydantic v1
import torch
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.utils import get_dht_time

from mesh import __version__
from mesh.admission import Admission
from mesh.config import AGGREGATIONS, AVERAGING_MODES, COMPRESSIONS, LR_SCHEDULES, OPTIMIZERS, RUN_ID_PATTERN
from mesh.errors import RunError

logger = logging.getLogger(__name__)
T = TypeVar("T", bound=pydantic.BaseModel)

RUNS_KEY = "mesh_runs"
# the record format this mesh writes and reads; a record of a later version (made by a newer mesh) is refused with one
# line. 2: the optimizer's settings (weight_decay, lr_schedule, warmup_epochs, total_epochs, clip_grad_norm)
RECORD_VERSION = 2
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
    weight_decay: pydantic.confloat(strict=True, ge=0) = 0.0
    lr_schedule: pydantic.StrictStr = "constant"
    warmup_epochs: pydantic.conint(strict=True, ge=0) = 0
    total_epochs: pydantic.conint(strict=True, ge=1) | None = None
    clip_grad_norm: pydantic.confloat(strict=True, gt=0) | None = None
    averaging: pydantic.StrictStr
    compression: pydantic.StrictStr
    aggregation: pydantic.StrictStr = "mean"
    matchmaking_time: pydantic.confloat(strict=True, gt=0)
    averaging_timeout: pydantic.confloat(strict=True, gt=0)
    average_state_every: pydantic.conint(strict=True, ge=1) = 10
    inner_steps: pydantic.conint(strict=True, ge=1) = 100  # --averaging diloco
    outer_lr: pydantic.confloat(strict=True, gt=0) = 0.7
    outer_momentum: pydantic.confloat(strict=True, ge=0, lt=1) = 0.9
    seed: pydantic.StrictInt
    created_at: pydantic.StrictFloat
    mesh_version: pydantic.StrictStr
    record_version: pydantic.conint(strict=True, ge=1, le=RECORD_VERSION) = 1
    signature: pydantic.StrictStr | None = None  # a protected run's: HMAC of the rest under the run's key

    class Config:
        extra = pydantic.Extra.forbid
        allow_mutation = False

    _check_optimizer = pydantic.validator("optimizer", allow_reuse=True)(_one_of((*OPTIMIZERS, "task")))  # task: its own
    _check_averaging = pydantic.validator("averaging", allow_reuse=True)(_one_of(AVERAGING_MODES))
    _check_compression = pydantic.validator("compression", allow_reuse=True)(_one_of(COMPRESSIONS))
    _check_aggregation = pydantic.validator("aggregation", allow_reuse=True)(_one_of(AGGREGATIONS))
    _check_schedule = pydantic.validator("lr_schedule", allow_reuse=True)(_one_of(LR_SCHEDULES))

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
    signature: pydantic.StrictStr | None = None  # a protected run's: HMAC of the peer id and the rest

    class Config:
        extra = pydantic.Extra.forbid


class _MeshSchema(pydantic.BaseModel):
    mesh_runs: dict[pydantic.StrictStr, RunRecord]
    mesh_peers: dict[pydantic.StrictStr, PeerPresence]


RUN_RECORD_VALIDATOR = SchemaValidator(_MeshSchema, allow_extra_keys=True)
PEERS_KEY = "mesh_peers"
PRESENCE_TTL = 20.0  # seconds; live peers refresh every PRESENCE_TTL / 4
OWNER_MARK = "[owner:"


def signature_validator() -> RSASignatureValidator:
    """hivemind's validator of owned subkeys, with this process's key (the one hivemind's progress tracker uses)."""
    return RSASignatureValidator()


def owned(name: str) -> str:
    """``name`` as a subkey only this process can write (its RSA public key in it)."""
    return name + signature_validator().local_public_key.decode()


def owner_free(subkey: str) -> str:
    """The run id or peer id a subkey names, without an owner's key."""
    return subkey.split(OWNER_MARK, 1)[0]


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
        weight_decay=float(hyper.get("weight_decay", 0.0)),
        lr_schedule=str(hyper.get("lr_schedule", "constant")),
        warmup_epochs=int(hyper.get("warmup_epochs", 0)),
        total_epochs=None if hyper.get("total_epochs") is None else int(hyper["total_epochs"]),
        clip_grad_norm=None if hyper.get("clip_grad_norm") is None else float(hyper["clip_grad_norm"]),
        averaging=str(hyper["averaging"]),
        compression=str(hyper["compression"]),
        aggregation=str(hyper.get("aggregation", "mean")),
        matchmaking_time=float(hyper["matchmaking_time"]),
        averaging_timeout=float(hyper["averaging_timeout"]),
        average_state_every=int(hyper.get("average_state_every", 10)),
        inner_steps=int(hyper.get("inner_steps", 100)),
        outer_lr=float(hyper.get("outer_lr", 0.7)),
        outer_momentum=float(hyper.get("outer_momentum", 0.9)),
        seed=int(hyper["seed"]),
        created_at=float(hyper.get("created_at") or time.time()),
        mesh_version=str(hyper.get("mesh_version") or __version__),
        record_version=RECORD_VERSION,
    )


def _content(model: pydantic.BaseModel) -> dict:
    return model.dict(exclude={"signature"})


def _entry(kind: str, name: str, model: pydantic.BaseModel, admission: Admission | None, signed: dict) -> tuple[str, dict]:
    """The subkey and value this peer writes under ``name``: a protected run's signed (``signed`` is what the
    signature covers), under this peer's own subkey. Every field is in the value, the signature's too (None when
    open): hivemind's schema validator refuses a value that parses only by filling in a default."""
    if admission is None or not admission.protected:
        return name, {**_content(model), "signature": None}
    return owned(name), {**_content(model), "signature": admission.sign(kind, signed)}


def record_entry(record: RunRecord, admission: Admission | None = None) -> tuple[str, dict]:
    """What this peer writes for the run's record (see :func:`_entry`)."""
    return _entry("record", record.run_id, record, admission, _content(record))


def presence_entry(peer_id: str, presence: PeerPresence, admission: Admission | None = None) -> tuple[str, dict]:
    """What this peer writes for its presence; the signature covers the peer id too."""
    return _entry("presence", peer_id, presence, admission, {"peer": peer_id, **_content(presence)})


def publish_run(dht: DHT, record: RunRecord, ttl: float = RECORD_TTL, admission: Admission | None = None) -> bool:
    """Store (or refresh) the record; True when at least one DHT node accepted it."""
    subkey, value = record_entry(record, admission)
    stored = dht.store(RUNS_KEY, subkey=subkey, value=value, expiration_time=get_dht_time() + ttl)
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


def record_copies(raw: Any) -> dict[str, list[tuple[str, RunRecord]]]:
    """Every copy of every run's record, as (subkey, record) by run id, dropping and counting anything malformed."""
    global invalid_records_dropped
    copies: dict[str, list[tuple[str, RunRecord]]] = {}
    for subkey, record in _parse_subkeys(raw, RunRecord, "run").items():
        if record.run_id != owner_free(subkey):
            invalid_records_dropped += 1
            logger.warning("dropped invalid run record subkey=%r error=subkey does not match run_id %r", subkey, record.run_id)
            continue
        copies.setdefault(record.run_id, []).append((subkey, record))
    return copies


def _earliest(copies: list[tuple[str, RunRecord]]) -> RunRecord:
    return min(copies, key=lambda item: (item[1].created_at, item[0]))[1]


def listed_record(copies: list[tuple[str, RunRecord]], admission: Admission | None = None) -> tuple[RunRecord, bool]:
    """The copy a lister (the coordinator, ``mesh status``) shows for a run, and whether it is verified: the earliest
    copy signed with ``admission``'s key when that is the run's; else an open run's earliest copy, else the earliest
    of all (unverified: without the run's key a lister cannot tell a genuine copy from a forged one)."""
    if admission is not None and admission.protected:
        genuine = [
            item for item in copies if item[1].signature is not None and admission.verify("record", _content(item[1]), item[1].signature)
        ]
        if genuine:
            return _earliest(genuine), True
    open_copies = [item for item in copies if item[1].signature is None]
    return _earliest(open_copies or copies), False


def choose_record(run_id: str, copies: list[tuple[str, RunRecord]], admission: Admission) -> RunRecord | None:
    """The record a peer holding ``admission`` trains by, from every copy under ``run_id``; None when there is none.

    An open peer takes an open run's copy and refuses a protected run (one with any signed copy). A protected peer
    takes only copies signed with its run's key (the creator's, the earliest, when several are), counts every other
    copy as a refused record, and refuses a run whose copies are all signed with another key (a wrong secret) or all unsigned (an
    open run of that id)."""
    signed = [item for item in copies if item[1].signature is not None]
    unsigned = [item for item in copies if item[1].signature is None]
    if not admission.protected:
        # any signed copy makes the run protected: an unsigned one beside it is somebody else's (an outsider's
        # forgery would otherwise lead a peer that forgot the secret into the outsider's run)
        if signed:
            raise RunError(f"run {run_id!r} is protected: pass its secret with --run-secret or MESH_RUN_SECRET")
        return _earliest(unsigned) if unsigned else None
    genuine = [item for item in signed if admission.verify("record", _content(item[1]), item[1].signature)]
    for subkey, _record in (item for item in copies if item not in genuine):
        admission.refuse("record", owner_free(subkey), detail="a copy of the run record is unsigned or forged", once=subkey)
    if genuine:
        return _earliest(genuine)
    if signed:
        raise RunError(f"run {run_id!r} is protected and this --run-secret is not its secret: check MESH_RUN_SECRET / --run-secret")
    if unsigned:
        raise RunError(f"run {run_id!r} is an open run (created without a secret): join it without --run-secret, or pick another run id")
    return None


def newer_record_version(raw: Any, run_id: str) -> int | None:
    """The record version of a copy of ``run_id``'s record that a newer mesh wrote (this one cannot read it)."""
    items = raw.value.items() if raw is not None and isinstance(getattr(raw, "value", None), dict) else ()
    for subkey, item in items:
        value = getattr(item, "value", None)
        version = value.get("record_version") if isinstance(value, dict) else None
        if owner_free(str(subkey)) == run_id and type(version) is int and version > RECORD_VERSION:
            return version
    return None


def fetch_run(dht: DHT, run_id: str, attempts: int = 3, delay: float = 1.0, admission: Admission | None = None) -> RunRecord | None:
    """The run's record, or None. Retries a little: a freshly joined node may not see the record at once.
    Raises RunError when the run is protected and ``admission`` cannot verify it (see :func:`choose_record`), and
    when only a newer mesh can read its record."""
    admission = admission or Admission(run_id)
    for attempt in range(attempts):
        raw = dht.get(RUNS_KEY, latest=True)
        record = choose_record(run_id, record_copies(raw).get(run_id, []), admission)
        if record is not None:
            return record
        version = newer_record_version(raw, run_id)
        if version is not None:
            raise RunError(
                f"run {run_id!r} was created by a newer mesh (record version {version}; this one reads up to "
                f"{RECORD_VERSION}): upgrade mesh here to join it"
            )
        if attempt + 1 < attempts:
            time.sleep(delay)
    return None


def announce_peer(dht: DHT, peer_id: str, presence: PeerPresence, ttl: float = PRESENCE_TTL, admission: Admission | None = None) -> bool:
    subkey, value = presence_entry(peer_id, presence, admission)
    return bool(dht.store(PEERS_KEY, subkey=subkey, value=value, expiration_time=get_dht_time() + ttl))


def parse_peers(
    raw: Any,
    run_id: str | None = None,
    admission: Admission | None = None,
    verify_with: Callable[[str], Admission | None] | None = None,
) -> dict[str, PeerPresence]:
    """Live peers by peer id, optionally only those of one run. Under ``admission``'s protected run only those
    whose presence is signed with the run's key (the others are counted as refused); ``verify_with`` gives such an
    admission per run id (a lister holding several runs' keys; None: the run's presences are taken as they are)."""
    peers: dict[str, PeerPresence] = {}
    for subkey, presence in _parse_subkeys(raw, PeerPresence, "peer").items():
        peer_id = owner_free(subkey)
        if run_id is not None and presence.run_id != run_id:
            continue
        rules = admission if admission is not None and presence.run_id == admission.run_id else None
        if rules is None and verify_with is not None:
            rules = verify_with(presence.run_id)
        if rules is not None and rules.protected:
            payload = {"peer": peer_id, **_content(presence)}
            if not rules.verify("presence", payload, presence.signature):
                rules.refuse("presence", peer_id, detail="its presence record is unsigned or forged", once=subkey)
                continue
        peers[peer_id] = presence
    return peers


def fetch_peers(dht: DHT, run_id: str | None = None, admission: Admission | None = None) -> dict[str, PeerPresence]:
    """Live peers (by peer id) announced in the DHT (see :func:`parse_peers`); malformed entries dropped."""
    return parse_peers(dht.get(PEERS_KEY, latest=True), run_id, admission)
