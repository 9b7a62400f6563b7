"""The run record's schema (as hivemind's DHT validator enforces it) and the parameter fingerprint."""

from __future__ import annotations

import pydantic.v1 as pydantic
import pytest
import torch
from hivemind.dht.crypto import DHTRecord
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time

from mesh.records import RUN_RECORD_VALIDATOR, RUNS_KEY, RunRecord, fingerprint, make_record, record_copies

HYPER = dict(
    batch_size=16,
    target_batch_size=64,
    optimizer="sgd",
    lr=0.1,
    averaging="gradients",
    compression="none",
    matchmaking_time=2,
    averaging_timeout=30,
    seed=0,
)


def _record(**overrides) -> RunRecord:
    return make_record("run-1", "regression", "0123456789abcdef", **{**HYPER, **overrides})


def _dht_record(subkey: str, value: dict) -> DHTRecord:
    return DHTRecord(
        key=DHTID.generate(source=RUNS_KEY).to_bytes(),
        subkey=DHTID.generate(source=subkey).to_bytes() if False else MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=get_dht_time() + 60,
    )


def test_make_record_coerces_numbers_to_the_strict_types() -> None:
    record = _record()
    assert isinstance(record.matchmaking_time, float) and isinstance(record.lr, float)
    assert RunRecord.parse_obj(record.dict()) == record
    # DiLoCo's settings default to the paper's outer optimizer; a record written before they existed still parses
    assert (record.inner_steps, record.outer_lr, record.outer_momentum) == (100, 0.7, 0.9)
    older = {k: v for k, v in record.dict().items() if k not in ("inner_steps", "outer_lr", "outer_momentum")}
    assert RunRecord.parse_obj(older) == record


@pytest.mark.parametrize(
    "field, value",
    [
        ("optimizer", "lamb"),
        ("compression", "zip"),
        ("averaging", "gossip"),
        ("batch_size", 0),
        ("lr", 0.0),
        ("run_id", "bad id"),
        ("fingerprint", "xyz"),
        ("target_batch_size", 8),
        ("inner_steps", 0),
        ("outer_lr", 0.0),
        ("outer_momentum", 1.0),
    ],
)
def test_schema_rejects_bad_fields(field: str, value) -> None:
    data = {**_record().dict(), field: value}
    with pytest.raises(pydantic.ValidationError):
        RunRecord.parse_obj(data)


def test_schema_rejects_unknown_fields_and_loose_types() -> None:
    with pytest.raises(pydantic.ValidationError):
        RunRecord.parse_obj({**_record().dict(), "extra": 1})
    with pytest.raises(pydantic.ValidationError):
        RunRecord.parse_obj({**_record().dict(), "batch_size": "16"})


def test_dht_validator_accepts_good_and_refuses_bad_records() -> None:
    good = _record().dict()
    assert RUN_RECORD_VALIDATOR.validate(_dht_record("run-1", good))
    assert not RUN_RECORD_VALIDATOR.validate(_dht_record("run-1", {**good, "lr": "fast"}))
    assert not RUN_RECORD_VALIDATOR.validate(_dht_record("run-1", {"hello": "world"}))


class _Item:
    def __init__(self, value) -> None:
        self.value = value


def test_record_copies_drops_and_counts_invalid_entries() -> None:
    import mesh.records as records

    before = records.invalid_records_dropped
    raw = _Item({"run-1": _Item(_record().dict()), "run-2": _Item({"junk": True}), "other": _Item(_record().dict())})
    parsed = record_copies(raw)
    assert list(parsed) == ["run-1"] and [subkey for subkey, _ in parsed["run-1"]] == ["run-1"]  # "other": wrong subkey
    assert records.invalid_records_dropped == before + 2
    assert record_copies(None) == {}


def test_fingerprint_depends_on_shapes_not_values() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    torch.manual_seed(1)
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    c = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    assert len(fingerprint(a)) == 16 and int(fingerprint(a), 16) >= 0


def test_a_record_a_newer_mesh_wrote_is_recognised_and_never_read_as_this_versions() -> None:
    from mesh.records import RECORD_VERSION, newer_record_version

    assert _record().record_version == RECORD_VERSION
    newer = {**_record().dict(), "record_version": RECORD_VERSION + 1, "a_later_setting": 1}
    raw = _Item({"run-1[owner:k]": _Item(newer), "run-2": _Item({**_record().dict(), "run_id": "run-2"})})
    assert record_copies(raw).get("run-1") is None  # this mesh cannot read it: no copy of its own making
    assert newer_record_version(raw, "run-1") == RECORD_VERSION + 1  # fetch_run says so in one line (RunError)
    assert newer_record_version(raw, "run-2") is None
    old = {k: v for k, v in _record().dict().items() if k not in ("record_version", "weight_decay", "lr_schedule")}
    assert RunRecord.parse_obj(old).record_version == 1  # a version-1 record (before the optimizer's settings) still reads
