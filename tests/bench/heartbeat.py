"""Heartbeat load benchmark for the coordinator (not a test: pytest does not collect this file).

What it measures: how many ``PUT /api/v1/peers/{peer_id}/heartbeat`` a real coordinator answers per second, and how
fast, when N simulated peers each send one heartbeat every ``--interval`` seconds, for each store (embedded SQLite file,
MongoDB). The target is the rate the peers need, N / interval (500/s for 1000 peers at 2 s), with p99 under 50 ms.

How: the coordinator runs in a separate process (``python -m mesh api``, its own process group); for MongoDB a
SecantusDB server is started as a subprocess too, unless ``--mongo-url`` names a server (a throwaway database is used
there and dropped afterwards). This process first joins every peer (one unmeasured heartbeat each: joining writes an
event too), then runs an open-loop schedule: send j is due at t0 + j * interval / N, for peer j mod N, whether or not
earlier answers came back. At most 100 requests are in flight (one aiohttp session, 100 connections); a request that
waits for a free slot starts late. Per request it records:

- latency: answer time minus actual send time (what the server and the network cost);
- schedule lag: actual send time minus scheduled time (how far the client fell behind: client-side queueing when the
  server is slow, or an overloaded event loop when this process is).

sent counts every scheduled request; errors are those without a 2xx answer (other statuses, client errors, timeouts
after 30 s, and "cancelled": no answer 30 s after the schedule ended). throughput = 2xx answers / (time from t0 to the
last answer, at least --seconds).

Run (from the repository root, on a quiet machine; this process and the coordinator each want a core):

    python -m tests.bench.heartbeat                         # both stores, 1000 peers, 2 s interval, 30 s
    python -m tests.bench.heartbeat --store embedded --peers 50 --seconds 5
    python -m tests.bench.heartbeat --store mongo --mongo-url mongodb://127.0.0.1:27017 --json hb.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from mesh.up import free_port

REPO = Path(__file__).resolve().parents[2]
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
RUN_ID = "bench-heartbeat"
P99_TARGET_MS = 50.0
MAX_IN_FLIGHT = 100
DRAIN_S = 30.0


def peer_id(index: int) -> str:
    """A valid base58 peer id (api.models.PEER_ID), 46 characters like a libp2p CIDv0: 'QmSim' + index in base58."""
    digits = ""
    while True:
        index, rest = divmod(index, 58)
        digits = B58[rest] + digits
        if index == 0:
            return "QmSim" + digits.rjust(41, "1")


def spawn(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 10 s."""
    for signum, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def wait_until(ready: Any, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready (exit code {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def can_connect(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def coordinator(store: str, workdir: Path, interval: float, mongo_url: str | None) -> Iterator[str]:
    """Start the coordinator (and SecantusDB for mongo without --mongo-url); yield its URL; stop all of it."""
    with contextlib.ExitStack() as stack:
        args = [
            "-m",
            "mesh",
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--heartbeat-interval",
            str(interval),
            "--address-file",
            str(workdir / "address"),
            "--db-path",
            str(workdir / "coordinator.db"),
        ]
        if store == "mongo":
            if mongo_url is None:
                port, log = free_port(), workdir / "secantus.log"
                db = spawn(
                    [
                        "-m",
                        "secantus",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--standalone",
                        "--storage-path",
                        str(workdir / "secantus"),
                        "--log-level",
                        "WARNING",
                    ],
                    log,
                    workdir,
                )
                stack.callback(stop, db)
                wait_until(lambda: can_connect(port), db, log, "SecantusDB")
                mongo_url = f"mongodb://127.0.0.1:{port}/"
            else:  # someone else's server: a throwaway database, dropped afterwards
                database = f"mesh_bench_{uuid.uuid4().hex[:12]}"
                args += ["--mongo-database", database]
                stack.callback(drop_database, mongo_url, database)
            args += ["--mongo-url", mongo_url]
        log = workdir / "coordinator.log"
        api = spawn(args, log, REPO)
        stack.callback(stop, api)
        address = workdir / "address"
        wait_until(lambda: address.exists() and address.read_text().endswith("\n"), api, log, "coordinator")
        yield address.read_text().strip()


def drop_database(url: str, database: str) -> None:
    """Best effort: a server that is down must not hide the error that ended the run."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    try:
        client: MongoClient[dict[str, Any]]
        with MongoClient(url, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(database)
    except PyMongoError as err:
        print(f"could not drop the benchmark database {database} at {url}: {err}", file=sys.stderr)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


async def drive(url: str, peers: int, interval: float, seconds: float) -> dict[str, Any]:
    """Join the peers, then send the open-loop heartbeat schedule; return the raw measurements."""
    ids = [peer_id(i) for i in range(peers)]
    body = {"run_id": RUN_ID, "task": "bench", "host": "sim", "device": "cpu", "version": "bench"}
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def beat(pid: str, due: float | None) -> None:
            async with slots:
                sent = time.perf_counter()
                try:
                    async with session.put(f"/api/v1/peers/{pid}/heartbeat", json=body) as resp:
                        await resp.read()
                        status = str(resp.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    status = type(err).__name__
            if due is not None:  # None: the unmeasured join
                latencies.append(time.perf_counter() - sent)
                lags.append(sent - due)
                statuses[status] += 1

        async with session.post("/api/v1/runs", json={"run_id": RUN_ID, "task": "bench", "max_peers": 10_000}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"POST /api/v1/runs: {resp.status} {await resp.text()}")
        await asyncio.gather(*(beat(pid, None) for pid in ids))
        tasks: list[asyncio.Task[None]] = []
        step, t0 = interval / peers, time.perf_counter()
        for j in range(int(seconds * peers / interval)):
            due = t0 + j * step
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(beat(ids[j % peers], due)))
        _, late = await asyncio.wait(tasks, timeout=DRAIN_S) if tasks else (set(), set())
        for task in late:  # still waiting for a slot or an answer DRAIN_S after the schedule ended
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            statuses["cancelled"] += len(late)
        elapsed = max(time.perf_counter() - t0, seconds)
    return {"latencies": latencies, "lags": lags, "statuses": statuses, "elapsed": elapsed}


def summarize(store: str, peers: int, interval: float, raw: dict[str, Any]) -> dict[str, Any]:
    statuses: Counter[str] = raw["statuses"]
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    sent = sum(statuses.values())
    ms = sorted(x * 1000 for x in raw["latencies"])
    lag_ms = sorted(x * 1000 for x in raw["lags"])
    target = peers / interval
    throughput = ok / raw["elapsed"]
    p99 = percentile(ms, 99)
    return {
        "store": store,
        "peers": peers,
        "interval": interval,
        "sent": sent,
        "ok": ok,
        "errors": sent - ok,
        "throughput": round(throughput, 1),
        "target": round(target, 1),
        "elapsed_s": round(raw["elapsed"], 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(ms[-1] if ms else 0.0, 1),
        "schedule_lag_p50_ms": round(percentile(lag_ms, 50), 1),
        "schedule_lag_p99_ms": round(percentile(lag_ms, 99), 1),
        "throughput_ratio": round(throughput / target, 3),
        "p99_ratio": round(p99 / P99_TARGET_MS, 3),
        "statuses": dict(statuses),
    }


def line(r: dict[str, Any]) -> str:
    errors = {k: v for k, v in r["statuses"].items() if not k.startswith("2")}
    return (
        f"store={r['store']} peers={r['peers']} interval={r['interval']}s sent={r['sent']} ok={r['ok']} "
        f"errors={r['errors']} throughput={r['throughput']:.1f}/s (target {r['target']:g}/s) p50={r['p50_ms']:.1f}ms "
        f"p99={r['p99_ms']:.1f}ms max={r['max_ms']:.1f}ms schedule_lag_p99={r['schedule_lag_p99_ms']:.1f}ms\n"
        f"  ratio: throughput/target={r['throughput_ratio']:.2f} p99/{P99_TARGET_MS:g}ms={r['p99_ratio']:.2f}"
        + (f" error kinds={errors}" if errors else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.heartbeat", description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("embedded", "mongo", "both"), default="both")
    parser.add_argument("--peers", type=int, default=1000, help="simulated peers (default 1000)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between one peer's heartbeats (default 2)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the measured schedule (default 30)")
    parser.add_argument("--mongo-url", default=None, help="use this MongoDB instead of starting SecantusDB")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as a JSON list")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.interval <= 0 or args.seconds <= 0:
        parser.error("--peers, --interval and --seconds must be positive")
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    for signum in (signal.SIGINT, signal.SIGTERM):  # both unwind like Ctrl-C (even where SIGINT was ignored)
        signal.signal(signum, signal.default_int_handler)
    results = []
    try:
        for store in ("embedded", "mongo") if args.store == "both" else (args.store,):
            with tempfile.TemporaryDirectory(prefix=f"hb-bench-{store}-") as tmp:
                with coordinator(store, Path(tmp), args.interval, args.mongo_url) as url:
                    with asyncio.Runner(loop_factory=loop_factory) as runner:
                        raw = runner.run(drive(url, args.peers, args.interval, args.seconds))
            results.append(summarize(store, args.peers, args.interval, raw))
            print(line(results[-1]), flush=True)
    except KeyboardInterrupt:
        print("interrupted; everything started here was stopped", file=sys.stderr)
        return 130
    except RuntimeError as err:  # the coordinator or SecantusDB did not start, or the run could not be created
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
