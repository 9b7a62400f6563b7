"""JSON logs: the message's key=value pairs are fields of their own, and every record names its role, run, peer."""

from __future__ import annotations

import json
import logging

from mesh import logs


def _reject(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def _record(message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("mesh.trainer", logging.INFO, __file__, 1, message, args, None)


def test_json_records_carry_fields_role_run_and_peer(monkeypatch) -> None:
    monkeypatch.setattr(logs, "_context", {})
    formatter = logs.JsonFormatter("peer")
    before = json.loads(formatter.format(_record("starting")))
    assert before["role"] == "peer" and "run" not in before and "peer_id" not in before
    logs.set_context(run="demo", peer_id="12D3KooWabc")
    line = formatter.format(_record("progress epoch=%d loss=%.4f group=%d state=%s", 3, 0.25, 2, "training"))
    data = json.loads(line)
    assert data["message"] == "progress epoch=3 loss=0.2500 group=2 state=training"
    assert (data["epoch"], data["loss"], data["group"], data["state"]) == (3, 0.25, 2, "training")
    assert isinstance(data["epoch"], int) and isinstance(data["loss"], float)
    strict = json.loads(formatter.format(_record("progress loss=%.4f big=1e400", float("nan"))), parse_constant=_reject)
    assert strict["loss"] == "nan" and strict["big"] == "1e400"  # valid JSON: no bare NaN / Infinity
    assert (data["role"], data["run"], data["peer_id"], data["level"], data["logger"]) == (
        "peer",
        "demo",
        "12D3KooWabc",
        "info",
        "mesh.trainer",
    )


def test_a_message_never_overwrites_the_records_own_fields(monkeypatch) -> None:
    monkeypatch.setattr(logs, "_context", {"run": "demo"})
    data = json.loads(logs.JsonFormatter("peer").format(_record("picked run=other level=9")))
    assert (data["run"], data["field_run"]) == ("demo", "other")
    assert (data["level"], data["field_level"]) == ("info", 9)
    same = json.loads(logs.JsonFormatter("peer").format(_record("training run=demo")))
    assert same["run"] == "demo" and "field_run" not in same  # the same value is not repeated
