"""``mesh status``: what the coordinator knows, as tables (or JSON)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from mesh.config import StatusConfig
from mesh.coordinator_client import Coordinator


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ago(stamp: str | None) -> str:
    if not stamp:
        return "-"
    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run(config: StatusConfig) -> int:
    coordinator = Coordinator(config.coordinator, config.api_token)

    def get(path: str) -> Any:
        return coordinator.get(path, missing_ok=False)

    summary = get("/summary")
    runs = [get(f"/runs/{config.run}")] if config.run else get("/runs?limit=100")["items"]
    query = f"?run_id={config.run}&limit=500" if config.run else "?limit=500"
    peers = get("/peers" + query)["items"]
    if config.output == "json":
        print(json.dumps({"summary": summary, "runs": runs, "peers": peers}, indent=2))
        return 0
    print(f"coordinator {config.coordinator} (version {summary['version']})")
    print("bootstrap: " + (", ".join(summary["bootstrap"]) or "-"))
    print()
    print(
        table(
            ["RUN", "TASK", "STATUS", "EPOCH", "LOSS", "SAMPLES/S", "PEERS"],
            [
                [
                    r["run_id"],
                    r["task"],
                    r["status"],
                    r["progress"]["epoch"],
                    _num(r["progress"]["loss"]),
                    _num(r["progress"]["samples_per_second"], 1),
                    r["progress"]["peers_alive"],
                ]
                for r in runs
            ],
        )
    )
    print()
    print(
        table(
            ["PEER", "RUN", "STATUS", "DEVICE", "EPOCH", "LOSS", "SAMPLES/S", "LAST SEEN"],
            [
                [
                    p["peer_id"][-12:],
                    p["run_id"],
                    p["status"],
                    p.get("gpu_name") or p["device"],
                    p["epoch"],
                    _num(p["loss"]),
                    _num(p["samples_per_second"], 1),
                    _ago(p["last_seen"]),
                ]
                for p in peers
            ],
        )
    )
    return 0
