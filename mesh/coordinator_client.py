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
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as err:
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


def pick_run(base: str) -> str:
    """``--run auto``: the active run that most needs peers (furthest below its minimum, then emptiest relative to
    its maximum, then oldest); full runs are skipped."""
    candidates = []
    for status in ("running", "created"):
        page = _get(base.rstrip("/") + f"/api/v1/runs?status={status}&limit=500") or {}
        candidates += page.get("items", [])
    open_runs = [r for r in candidates if r["progress"]["peers_alive"] < r["max_peers"] and r["task"] != "unknown"]
    if not open_runs:
        raise JoinError(f"the coordinator at {base} has no active run with room for a peer; create one or name it with --run")

    def need(run: dict) -> tuple:
        alive = run["progress"]["peers_alive"]
        return (-(run["min_peers"] - alive), alive / run["max_peers"], run["created_at"])

    return min(open_runs, key=need)["run_id"]
