"""Logging, configured once per process: short key=value lines for people, or JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data)


# Messages hivemind's background tasks produce when they are cancelled at shutdown or between rounds: expected,
# harmless, and alarming to read ("Task was destroyed but it is pending!"). Shown at --log-level debug.
_CANCELLATION_NOISE = (
    "Task was destroyed but it is pending",
    "Exception in <Task cancelling",
    "aclose(): asynchronous generator is already running",
    "Task exception was never retrieved",
    "It is recommended to use request_timeout smaller than min_matchmaking_time",
)


class _DropCancellationNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "asyncio" or record.name.startswith("hivemind")):
            return True
        message = record.getMessage()
        return not any(noise in message for noise in _CANCELLATION_NOISE)


_level = "info"


def configure(level: str = "info", fmt: str = "text", role: str = "") -> None:
    """Set up the root logger. hivemind is routed through it by ``route_hivemind``, which ``start_dht`` calls: only
    processes that join the DHT import hivemind (and torch), so the coordinator image can have neither."""
    global _level
    _level = level.lower()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{role} " if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if _level != "debug":
        handler.addFilter(_DropCancellationNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def route_hivemind() -> None:
    """hivemind is chatty at INFO (every matchmaking step): send it through our handler, one level quieter."""
    from hivemind.utils import logging as hm_logging

    hm_logging.use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel("DEBUG" if _level == "debug" else "WARNING")
