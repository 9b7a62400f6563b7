"""The one client of the coordinator's REST API on the peer's side (and ``mesh status``): where it is, and the
bearer token that goes with every request, reads included (a coordinator started with ``--protect-reads`` answers
401 to reads without it). One-shot requests are synchronous (a peer's start-up, ``mesh status``); the heartbeat
thread (:mod:`mesh.reporting`) takes its URLs and headers from here."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from mesh.errors import JoinError

TIMEOUT = 10.0


class Coordinator:
    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def api(self, path: str) -> str:
        """The URL of ``/api/v1`` + ``path``."""
        return f"{self.base}/api/v1{path}"

    def get(self, path: str, missing_ok: bool = True) -> Any:
        """The JSON at ``/api/v1`` + ``path``; None for a 404 when ``missing_ok``. Failures are one-line JoinErrors."""
        url = self.api(path)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers), timeout=TIMEOUT) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            if err.code == 404 and missing_ok:
                return None
            try:
                message = json.load(err)["error"]["message"]
            except Exception:
                message = err.reason
            if err.code in (401, 403):
                hint = "pass its token with --api-token" if not self.headers else "check --api-token"
                raise JoinError(f"the coordinator at {self.base} refused the request (HTTP {err.code}: {message}); {hint}") from None
            raise JoinError(f"the coordinator at {url} answered HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise JoinError(
                f"cannot reach the coordinator at {self.base}: {reason}; check --coordinator, or join with --join ADDR"
            ) from None

    def bootstrap_addrs(self) -> tuple[str, ...]:
        data = self.get("/bootstrap") or {}
        addrs = tuple(data.get("addrs") or ())
        if not addrs:
            raise JoinError(
                f"the coordinator at {self.base} knows no bootstrap address (start it with --bootstrap ADDR), or pass --join ADDR"
            )
        return addrs

    def run_config(self, run_id: str) -> dict[str, Any] | None:
        """The run as the coordinator stores it, or None when it does not know the run."""
        return self.get(f"/runs/{run_id}")

    def run_secret(self, run_id: str) -> str | None:
        """The run's secret, when the coordinator hands secrets out (``--run-secret-key``) and knows the run."""
        data = self.get(f"/runs/{run_id}/secret") or {}
        secret = data.get("run_secret")
        return secret if isinstance(secret, str) else None

    def pick_run(self) -> str:
        """``--run auto``: the active run that most needs peers (furthest below its minimum, then emptiest relative
        to its maximum, then oldest); full runs are skipped."""
        candidates = []
        for status in ("running", "created"):
            page = self.get(f"/runs?status={status}&limit=500") or {}
            candidates += page.get("items", [])
        open_runs = [r for r in candidates if r["progress"]["peers_alive"] < r["max_peers"] and r["task"] != "unknown"]
        if not open_runs:
            raise JoinError(f"the coordinator at {self.base} has no active run with room for a peer; create one or name it with --run")

        def need(run: dict) -> tuple:
            alive = run["progress"]["peers_alive"]
            return (-(run["min_peers"] - alive), alive / run["max_peers"], run["created_at"])

        return min(open_runs, key=need)["run_id"]
