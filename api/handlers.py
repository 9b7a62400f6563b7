"""Request handlers: parse and validate, call the store, shape the response. Domain errors become HTTP errors in
``errors.error_middleware``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast, get_args

from aiohttp import web
from pydantic import BaseModel, ValidationError

from api.errors import InvalidParameter
from api.keys import ADVANCE_LOCK, BOOTSTRAP_CACHE, CONFIG, PUBLISH, RUN_CACHE, STORE
from api.models import (
    PEER_ID,
    RUN_ID,
    Bootstrap,
    Event,
    EventPage,
    Health,
    Heartbeat,
    HeartbeatResponse,
    HistoryList,
    HistoryPoint,
    Hyperparameters,
    PeerPage,
    PeerStatus,
    Run,
    RunCreate,
    RunPage,
    RunProgress,
    RunSecret,
    RunStatus,
    Summary,
    utcnow,
)
from api.store.base import MAX_LIMIT, NotFound, Store
from mesh import __version__, join_url, metrics
from mesh.admission import coordinator_secret
from mesh.errors import JoinError

logger = logging.getLogger(__name__)

RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
PEER_STATUSES: tuple[PeerStatus, ...] = get_args(PeerStatus)
M = TypeVar("M", bound=BaseModel)
S = TypeVar("S", bound=str)


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


async def parse_body(request: web.Request, model: type[M]) -> M:
    # strict: JSON true is not a number, "5" is not an integer (lax mode would quietly accept both)
    return model.model_validate_json(await request.read(), strict=True)


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParameter(name, f"must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise InvalidParameter(name, f"must be between {low} and {high}, got {value}")
    return value


def choice_param(request: web.Request, name: str, choices: tuple[S, ...]) -> S | None:
    raw = request.query.get(name)
    if raw is not None and raw not in choices:
        raise InvalidParameter(name, f"must be one of {', '.join(choices)}, got {raw!r}")
    return cast("S | None", raw)


def path_id(request: web.Request, name: str, pattern: str) -> str:
    import re

    value = request.match_info[name]
    if not re.match(pattern, value):
        raise InvalidParameter(name, f"{value!r} is not a valid {name.replace('_', ' ')}")
    return value


def page_params(request: web.Request) -> tuple[int, int]:
    return int_param(request, "limit", 50, 1, MAX_LIMIT), int_param(request, "offset", 0, 0, 10**9)


def store_of(request: web.Request) -> Store:
    return request.app[STORE]


async def record_event(store: Store, kind: str, message: str, run_id: str | None = None, peer_id: str | None = None) -> None:
    await store.add_event(Event(event_id=uuid.uuid4().hex, run_id=run_id, peer_id=peer_id, kind=kind, message=message, time=utcnow()))


# health


async def health(request: web.Request) -> web.Response:
    return reply(Health(status="ok", version=__version__))


async def ready(request: web.Request) -> web.Response:
    await store_of(request).ping()
    return reply(Health(status="ready", version=__version__))


async def run_counts(store: Store) -> dict[str, int]:
    """How many runs are in each status."""
    return {status: (await store.list_runs(status, 1, 0))[1] for status in RUN_STATUSES}


async def summary(request: web.Request) -> web.Response:
    store = store_of(request)
    runs = await run_counts(store)
    peers: dict[str, int] = dict.fromkeys(PEER_STATUSES, 0)
    for (_run, status), count in (await store.count_peers()).items():
        peers[status] = peers.get(status, 0) + count
    return reply(Summary(runs=runs, peers=peers, bootstrap=await bootstrap_addrs(request.app), version=__version__))


async def bootstrap(request: web.Request) -> web.Response:
    return reply(Bootstrap(addrs=await bootstrap_addrs(request.app)))


BOOTSTRAP_CACHE_SECONDS = 10.0


async def bootstrap_addrs(app: web.Application) -> list[str]:
    """``--bootstrap`` as multiaddrs: a bootstrap's health URL is replaced by the addresses it lists (cached), so a
    peer that asks from another machine gets the announced multiaddr, not a service name only resolvable here.
    A URL that has never answered is handed out as it is: the peer retries it itself."""
    addrs: list[str] = []
    cache = app[BOOTSTRAP_CACHE]
    for entry in app[CONFIG].bootstrap:
        if not join_url.is_url(entry):
            addrs.append(entry)
            continue
        expires, fetched = cache.get(entry, (0.0, None))
        if time.monotonic() >= expires:
            try:
                fetched = await asyncio.to_thread(join_url.fetch_addrs, entry, 0.0)
                cache[entry] = (time.monotonic() + BOOTSTRAP_CACHE_SECONDS, fetched)
            except JoinError as err:  # keep what it listed last time, if anything
                logger.warning("bootstrap url does not answer url=%s error=%s", entry, err)
        addrs.extend(fetched or [entry])
    return addrs


# runs


async def list_runs(request: web.Request) -> web.Response:
    status = choice_param(request, "status", RUN_STATUSES)
    limit, offset = page_params(request)
    items, total = await store_of(request).list_runs(status, limit, offset)
    return reply(RunPage(items=items, total=total, limit=limit, offset=offset))


async def create_run(request: web.Request) -> web.Response:
    body = await parse_body(request, RunCreate)
    if body.min_peers > body.max_peers:
        raise InvalidParameter("min_peers", "must not exceed max_peers")
    now = utcnow()
    fields = body.model_dump()
    fields["hyperparameters"] = await asyncio.to_thread(_with_task_defaults, body.task, fields["hyperparameters"])
    run = await store_of(request).create_run(Run(**fields, created_at=now, updated_at=now))
    await record_event(store_of(request), "run_created", f"run {run.run_id} created (task {run.task})", run.run_id)
    publish = request.app.get(PUBLISH)
    if publish is not None and await publish(run):
        await record_event(store_of(request), "run_published", f"run {run.run_id} published to the DHT", run.run_id)
    return reply(run, status=201)


def _with_task_defaults(task_spec: str, hyper: dict) -> dict:
    """Unset hyperparameters become the task's defaults, as a peer creating the run would choose them. Only for the
    built-in tasks: a ``module:function`` task would mean importing and calling code named by a request, so its
    unset values stay unset, for the first peer to resolve (as they do where torch is missing: the coordinator's
    image)."""
    try:
        from mesh.runs import resolve_hyperparameters
        from mesh.tasks import BUILTIN_TASKS
    except ImportError as err:
        logger.info("task defaults not resolvable here (%s); unset hyperparameters stay the task's defaults", err)
        return hyper
    if task_spec not in BUILTIN_TASKS:
        return hyper
    return {**hyper, **resolve_hyperparameters(BUILTIN_TASKS[task_spec]().defaults, hyper)}


async def get_run(request: web.Request) -> web.Response:
    return reply(await store_of(request).get_run(path_id(request, "run_id", RUN_ID)))


async def run_secret(request: web.Request) -> web.Response:
    """A run's secret, for a peer that holds the API token (the auth middleware asks for it on this path even when
    reads are open). Derived from ``--run-secret-key`` and the run id (mesh.admission.coordinator_secret)."""
    run_id = path_id(request, "run_id", RUN_ID)
    key = request.app[CONFIG].run_secret_key
    if not key:
        raise NotFound("this coordinator hands out no run secrets: start it with --run-secret-key (docs/security.md)")
    await store_of(request).get_run(run_id)  # NotFound for a run it does not know
    return reply(RunSecret(run_id=run_id, run_secret=coordinator_secret(key, run_id)))


async def stop_run(request: web.Request) -> web.Response:
    run_id = path_id(request, "run_id", RUN_ID)
    run = await store_of(request).set_run_status(run_id, "stopped", utcnow())
    _forget_run(request, run_id)
    await record_event(store_of(request), "run_stopped", f"run {run_id} stopped; peers leave at their next heartbeat", run_id)
    return reply(run)


async def run_history(request: web.Request) -> web.Response:
    run_id = path_id(request, "run_id", RUN_ID)
    await store_of(request).get_run(run_id)  # 404 for an unknown run, not an empty list
    limit = int_param(request, "limit", MAX_LIMIT, 1, 10_000)
    return reply(HistoryList(items=await store_of(request).list_history(run_id, limit)))


async def run_events(request: web.Request) -> web.Response:
    run_id = path_id(request, "run_id", RUN_ID)
    await store_of(request).get_run(run_id)
    limit, offset = page_params(request)
    items, total = await store_of(request).list_events(run_id, limit, offset)
    return reply(EventPage(items=items, total=total, limit=limit, offset=offset))


# peers


async def list_peers(request: web.Request) -> web.Response:
    run_id = request.query.get("run_id")
    if run_id is not None:
        import re

        if not re.match(RUN_ID, run_id):
            raise InvalidParameter("run_id", f"{run_id!r} is not a valid run id")
    status = choice_param(request, "status", PEER_STATUSES)
    limit, offset = page_params(request)
    items, total = await store_of(request).list_peers(run_id, status, limit, offset)
    return reply(PeerPage(items=items, total=total, limit=limit, offset=offset))


async def get_peer(request: web.Request) -> web.Response:
    return reply(await store_of(request).get_peer(path_id(request, "peer_id", PEER_ID)))


async def heartbeat(request: web.Request) -> web.Response:
    peer_id = path_id(request, "peer_id", PEER_ID)
    beat = await parse_body(request, Heartbeat)
    store, now = store_of(request), utcnow()
    run = await _run_for_heartbeat(request, store, beat, now)
    peer, newly_joined = await store.heartbeat(peer_id, beat, now)
    if newly_joined:
        await record_event(store, "peer_joined", f"peer {peer_id} joined on {beat.device or 'unknown device'}", beat.run_id, peer_id)
    if run.status in ("created", "running") and beat.epoch > run.progress.epoch:
        async with request.app[ADVANCE_LOCK]:  # two peers reaching epochs 6 and 7 at once: only forward
            run = await store.get_run(run.run_id)
            if beat.epoch > run.progress.epoch:
                run = await _advance_run(store, run, beat, now)
            _forget_run(request, run.run_id)
    return reply(HeartbeatResponse(peer=peer, run_status=run.status, newly_joined=newly_joined))


# Heartbeats are the hot path (hundreds a second): the run each one names is read from the store at most once a
# second per run. A stop is still seen within a second, and the handlers that change a run drop its entry.
RUN_CACHE_SECONDS = 1.0


def _forget_run(request: web.Request, run_id: str) -> None:
    request.app[RUN_CACHE].pop(run_id, None)


async def _run_for_heartbeat(request: web.Request, store: Store, beat: Heartbeat, now: datetime) -> Run:
    """The heartbeat's run; a run created in the DHT (not through this API) is recorded on first sight."""
    cache = request.app[RUN_CACHE]
    cached = cache.get(beat.run_id)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    try:
        run = await store.get_run(beat.run_id)
        cache[beat.run_id] = (time.monotonic() + RUN_CACHE_SECONDS, run)
        return run
    except NotFound:
        run = Run(
            run_id=beat.run_id,
            task=beat.task or "unknown",
            hyperparameters=_reported_hyperparameters(beat),
            status="running",
            created_at=now,
            updated_at=now,
        )
        from api.store.base import Conflict

        try:
            run = await store.create_run(run)
        except Conflict:  # a concurrent heartbeat recorded it first
            return await store.get_run(beat.run_id)
        await record_event(store, "run_discovered", f"run {beat.run_id} first seen through a peer's heartbeat", beat.run_id)
        return run


def _reported_hyperparameters(beat: Heartbeat) -> Hyperparameters:
    """The settings a peer reported for its run; the defaults when it reported none or some outside this API's
    bounds (a heartbeat is never refused for its run's settings)."""
    try:
        return Hyperparameters(**(beat.hyperparameters or {}))
    except (ValidationError, TypeError) as err:
        logger.warning("run %s recorded with default hyperparameters: the reported ones do not fit (%s)", beat.run_id, err)
        return Hyperparameters()


async def _advance_run(store: Store, run: Run, beat: Heartbeat, now: datetime) -> Run:
    """A peer reached a new epoch: update the run's progress and add the epoch's history point."""
    counts = await store.count_peers()
    alive = counts.get((run.run_id, "alive"), 0)
    progress = RunProgress(
        epoch=beat.epoch,
        samples=beat.epoch * (run.hyperparameters.target_batch_size or 0),  # unknown until a peer resolves it
        loss=beat.loss,
        samples_per_second=beat.samples_per_second,
        peers_alive=alive,
    )
    run = await store.update_run_progress(run.run_id, progress, now)
    await store.add_history(
        HistoryPoint(
            run_id=run.run_id,
            epoch=beat.epoch,
            loss=beat.loss,
            eval_loss=beat.eval_loss,
            lr=beat.lr,
            samples_per_second=beat.samples_per_second,
            peers=alive,
            time=now,
        )
    )
    return run


async def leave(request: web.Request) -> web.Response:
    peer_id = path_id(request, "peer_id", PEER_ID)
    peer = await store_of(request).leave(peer_id, utcnow())
    await record_event(store_of(request), "peer_left", f"peer {peer_id} left gracefully", peer.run_id, peer_id)
    return reply(peer)


async def mark_lost_peers(store: Store, interval: float) -> list[Any]:
    """Peers silent for 3 heartbeat intervals become lost, each with an event."""
    now = utcnow()
    lost = await store.mark_lost(now - timedelta(seconds=3 * interval), now)
    for peer in lost:
        metrics.api_peers_lost.labels(peer.run_id).inc()
        await record_event(store, "peer_lost", f"peer {peer.peer_id} missed 3 heartbeats", peer.run_id, peer.peer_id)
        logger.warning("peer lost peer_id=%s run=%s", peer.peer_id, peer.run_id)
    return lost
