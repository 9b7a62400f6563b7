"""Logging, configured once per process: short key=value lines for people, or JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time

_FIELD = re.compile(r"(?<![\w.])([a-z_][a-z0-9_]*)=(\S+)")
_context: dict[str, str] = {}


def set_context(**fields: str | None) -> None:
    """Fields every JSON record of this process carries from now on (``run``, ``peer_id``), once they are known."""
    _context.update({k: str(v) for k, v in fields.items() if v is not None})


def _value(text: str) -> object:
    """A number where the text is one; NaN and ±inf stay text (JSON has no such numbers; strict parsers reject them)."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text
    return text


def fields_of(message: str) -> dict[str, object]:
    """The ``key=value`` pairs of a log message (the project's convention), numbers as numbers."""
    return {key: _value(value.rstrip(",;")) for key, value in _FIELD.findall(message)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the process's role, run and peer id (once known), the message,
    and the message's ``key=value`` pairs as fields of their own (``epoch=3 loss=0.25`` -> ``"epoch": 3, "loss": 0.25``)."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            **({"role": self.role} if self.role else {}),
            **_context,
            "message": message,
        }
        for key, value in fields_of(message).items():
            if key not in data:
                data[key] = value
            elif str(data[key]) != str(value):  # never shadow the record's own fields: keep both
                data[f"field_{key}"] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


# Messages hivemind's background tasks produce when they are cancelled at shutdown or between rounds: expected,
# harmless, and alarming to read ("Task was destroyed but it is pending!"). Shown at --log-level debug.
_CANCELLATION_NOISE = (
    "Task was destroyed but it is pending",
    "Exception in <Task cancelling",
    "aclose(): asynchronous generator is already running",
    "Task exception was never retrieved",
    "It is recommended to use request_timeout smaller than min_matchmaking_time",
)


class _HivemindNoise(logging.Filter):
    """Drops hivemind's and asyncio's cancellation noise and shortens the DHT's orphaned-request traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "asyncio" or record.name.startswith("hivemind")):
            return True
        _shorten_orphaned_dht_request(record)
        message = record.getMessage()
        return not any(noise in message for noise in _CANCELLATION_NOISE)


def _shorten_orphaned_dht_request(record: logging.LogRecord) -> None:
    """hivemind's DHT process logs a whole traceback when it cannot read a request off its pipe. Every request
    carries its caller's reply pipe, fetched from the caller's process on reading; when the caller (the averager's
    process, at a leave) exited between sending and the read, that fetch fails and the request had no one to answer.
    Harmless, and it happens at ordinary exits: one warning line, without the traceback (which --log-level debug
    keeps)."""
    if record.name != "hivemind.dht.dht" or record.funcName != "_run" or not record.exc_info:
        return
    error = record.exc_info[1]
    record.msg, record.args, record.exc_info, record.exc_text = (
        "dropped a DHT request whose sender had exited before it was read (%s: %s)",
        (type(error).__name__, error),
        None,
        None,
    )
    record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)


_level = "info"


def configure(level: str = "info", fmt: str = "text", role: str = "") -> None:
    """Set up the root logger. hivemind is routed through it by ``route_hivemind``, which ``start_dht`` calls: only
    processes that join the DHT import hivemind (and torch), so the coordinator image can have neither."""
    global _level
    _level = level.lower()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        prefix = f"{role} " if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if _level != "debug":
        handler.addFilter(_HivemindNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def route_hivemind() -> None:
    """hivemind is chatty at INFO (every matchmaking step): send it through our handler, one level quieter."""
    from hivemind.utils import logging as hm_logging

    hm_logging.use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel("DEBUG" if _level == "debug" else "WARNING")
