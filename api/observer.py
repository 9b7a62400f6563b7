"""The DHT observer: with ``mesh api --join``, the coordinator joins the DHT as a client and records the runs and
peers announced there, so it knows peers that never reached it over HTTP. It also publishes runs created
through the API, so peers can join them with just ``--join`` and ``--run``.

Imports hivemind (and so torch): only loaded when the coordinator is given ``--join``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import datetime, timezone

from hivemind import DHT

from api.models import Heartbeat, Hyperparameters, Run, utcnow
from api.store.base import Conflict, NotFound, Store, StoreError
from mesh.admission import Admission, coordinator_secret
from mesh.config import NetworkConfig, RunDefaults
from mesh.dht import start_dht
from mesh.records import PEERS_KEY, RUNS_KEY, RunRecord, listed_record, parse_peers, publish_run, record_copies
from mesh.runs import create_record
from mesh.tasks import load_task

logger = logging.getLogger(__name__)


def join(addrs: tuple[str, ...], timeout: float = 30.0) -> DHT:
    """Start the client DHT node. Call before the event loop starts: hivemind forks."""
    return start_dht(NetworkConfig(join=addrs, host="127.0.0.1", client_mode=True, join_timeout=timeout))


async def _skip(store: Store, peer_id: str, presence_time: float, fresh_within: float) -> bool:
    """Keep the stored record when the peer reports itself over HTTP (richer than its DHT presence), or when it
    left after this presence was published (the presence outlives a graceful leave by up to its TTL)."""
    try:
        peer = await store.get_peer(peer_id)
    except NotFound:
        return False
    if peer.status == "left" and peer.left_at is not None and peer.left_at.timestamp() >= presence_time:
        return True
    return peer.source == "heartbeat" and (utcnow() - peer.last_seen).total_seconds() < fresh_within


@functools.lru_cache(maxsize=1024)
def _admission(run_secret_key: str, run_id: str) -> Admission:
    """The rules of a run whose secret this coordinator hands out (kept: its refusal log limits hold across scans)."""
    return Admission(run_id, coordinator_secret(run_secret_key, run_id))


def read_runs(dht: DHT, run_secret_key: str | None = None) -> tuple[dict[str, RunRecord], dict[str, Admission]]:
    """The DHT's runs, one record each, and the protected runs this coordinator could verify: with
    ``--run-secret-key``, a run whose secret it hands out is listed by a copy signed with that secret (an outsider's
    copies, earlier or unsigned, are passed over); a run protected with a secret of its own is listed unverified."""
    runs, verified = {}, {}
    for run_id, copies in record_copies(dht.get(RUNS_KEY, latest=True)).items():
        signed = any(record.signature is not None for _, record in copies)
        admission = _admission(run_secret_key, run_id) if run_secret_key and signed else None
        runs[run_id], ok = listed_record(copies, admission)
        if ok and admission is not None:
            verified[run_id] = admission
    return runs, verified


async def observe_once(dht: DHT, store: Store, fresh_within: float = 15.0, run_secret_key: str | None = None) -> tuple[int, int]:
    """Record the DHT's runs and live peers; returns (runs added, peers seen). A verified protected run's peers are
    recorded only when their presence is signed with its key."""
    runs, verified = await asyncio.to_thread(read_runs, dht, run_secret_key)
    added = 0
    for record in runs.values():
        try:
            await store.get_run(record.run_id)
        except NotFound:
            hyper = Hyperparameters(**{k: getattr(record, k) for k in Hyperparameters.model_fields})
            now = utcnow()
            run = Run(
                run_id=record.run_id,
                task=record.task,
                hyperparameters=hyper,
                status="running",
                created_at=datetime.fromtimestamp(record.created_at, timezone.utc),
                updated_at=now,
            )
            try:
                await store.create_run(run)
                added += 1
            except Conflict:
                pass
    raw_peers = await asyncio.to_thread(functools.partial(dht.get, PEERS_KEY, latest=True))
    peers = parse_peers(raw_peers, verify_with=verified.get)
    for peer_id, presence in peers.items():
        beat = Heartbeat(
            run_id=presence.run_id,
            device=presence.device,
            epoch=presence.epoch,
            samples_per_second=presence.samples_per_second,
            loss=presence.loss,
        )
        if presence.run_id not in runs:
            try:
                await store.get_run(presence.run_id)
            except NotFound:
                continue  # the peer's run record has not reached us yet
        if not await _skip(store, peer_id, presence.time, fresh_within):
            await store.heartbeat(peer_id, beat, utcnow(), source="dht")
    return added, len(peers)


async def observe_forever(dht: DHT, store: Store, interval: float, heartbeat_interval: float, run_secret_key: str | None = None) -> None:
    while True:
        try:
            added, seen = await observe_once(dht, store, fresh_within=3 * heartbeat_interval, run_secret_key=run_secret_key)
            logger.debug("dht observed runs_added=%d peers=%d", added, seen)
        except StoreError as err:
            logger.warning("dht observation not recorded error=%s", err)
        except Exception:
            logger.exception("dht observation failed")
        await asyncio.sleep(interval)


def publish(dht: DHT, run: Run, run_secret_key: str | None = None) -> bool:
    """Publish a run created through the API; needs the task importable here to fingerprint its model. With
    ``--run-secret-key`` the run is protected: its record is signed with the secret the coordinator hands out."""
    try:
        task = load_task(run.task)
    except Exception as err:
        logger.warning(
            "run %s not published to the DHT: task %s not loadable here (%s); peers with --coordinator still get its config",
            run.run_id,
            run.task,
            err,
        )
        return False
    defaults = RunDefaults(**run.hyperparameters.model_dump())
    record = create_record(run.run_id, run.task, task, defaults)
    secret = coordinator_secret(run_secret_key, run.run_id) if run_secret_key else None
    return publish_run(dht, record, admission=Admission(run.run_id, secret))
