"""JSON logs: the message's key=value pairs are fields of their own, and every record names its role, run, peer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from mesh import logs

ROOT = Path(__file__).resolve().parents[2]


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


# A real DHT process meets a request whose sender exited before the DHT read it (the sender, a forked process as
# hivemind's averager is, sends while the DHT process is stopped, then exits; the DHT process is let go after).
_ORPHANED_REQUEST = """
import os, signal, sys, time
import hivemind
from mesh import logs
logs.configure(sys.argv[1], role="t")
logs.route_hivemind()
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], wait_timeout=0.5, shutdown_timeout=10)
os.kill(dht.pid, signal.SIGSTOP)
child = os.fork()
if child == 0:
    dht.get("key", return_future=True)  # the request carries this process's reply pipe, shared from this process
    os._exit(0)
os.waitpid(child, 0)
os.kill(dht.pid, signal.SIGCONT)
time.sleep(1.0)
dht.shutdown()
"""


def _orphaned_request_log(level: str) -> str:
    result = subprocess.run([sys.executable, "-c", _ORPHANED_REQUEST, level], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_a_dht_request_whose_sender_exited_is_one_warning_line_not_a_traceback() -> None:
    log = _orphaned_request_log("info")
    lines = [line for line in log.splitlines() if "hivemind.dht.dht" in line]
    assert len(lines) == 1, log
    assert " WARN hivemind.dht.dht: dropped a DHT request whose sender had exited before it was read (" in lines[0]
    assert "Traceback" not in log
    assert "Traceback" in _orphaned_request_log("debug")  # hivemind's own record, whole, at --log-level debug
