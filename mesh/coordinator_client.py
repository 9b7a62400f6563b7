"""What a peer asks the coordinator before it joins: the bootstrap addresses and a run's config (one-shot, sync)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from mesh.errors import JoinError

TIMEOUT = 10.0


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise JoinError(f"the coordinator at {url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise JoinError(f"cannot reach the coordinator at {url}: {reason}; check --coordinator, or join with --join ADDR") from None


def bootstrap_addrs(base: str) -> tuple[str, ...]:
    data = _get(base.rstrip("/") + "/api/v1/bootstrap") or {}
    addrs = tuple(data.get("addrs") or ())
    if not addrs:
        raise JoinError(f"the coordinator at {base} knows no bootstrap address (start it with --bootstrap ADDR), or pass --join ADDR")
    return addrs


def run_config(base: str, run_id: str) -> dict[str, Any] | None:
    """The run as the coordinator stores it, or None when it does not know the run."""
    return _get(base.rstrip("/") + f"/api/v1/runs/{run_id}")
