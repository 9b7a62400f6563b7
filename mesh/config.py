"""Configuration: one frozen dataclass per component, resolved as flags > MESH_* environment > file > defaults.

Only entry points call :func:`resolve`; the resulting object is passed down. Every field can be set by the flag
``--field-name``, the environment variable ``MESH_FIELD_NAME`` and the key ``field_name`` of a TOML or JSON file
given with ``--config`` (or ``MESH_CONFIG``); a file may also hold per-command tables (``[peer]``, ``[bootstrap]``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from mesh.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "MESH_"
ADDITIVE_FIELDS = ("task_arg",)  # a flag adds to (and overrides keys of) the file's entries instead of replacing them
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adam", "adamw")
COMPRESSIONS = ("none", "fp16", "8bit")
AVERAGING_MODES = ("gradients", "local", "diloco")
AGGREGATIONS = ("mean", "clipped")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("csv", "tensorboard", "wandb")
DATA_PLANES = ("gloo", "nccl", "hivemind")
LOG_FORMATS = ("text", "json")
SECRET_FIELDS = ("api_token", "mongo_url", "run_secret", "run_secret_key")
MIN_SECRET_LENGTH = 16
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return run_id


def check_secret(secret: str | None) -> None:
    if secret is not None and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"--run-secret must be at least {MIN_SECRET_LENGTH} characters (got {len(secret)}); make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )


def check_schedule(schedule: str, warmup: int, total: int | None, weight_decay: float, clip: float | None) -> None:
    _check_choice("lr_schedule", schedule, LR_SCHEDULES)
    _check_positive("warmup_epochs", warmup, allow_zero=True)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    _check_positive("clip_grad_norm", clip)
    _check_positive("total_epochs", total)
    if schedule != "constant" and (total is None or total <= warmup):
        raise ConfigError(f"--lr-schedule {schedule} needs --total-epochs above --warmup-epochs ({warmup}), got {total}")


def _check_port(name: str, port: int | None) -> None:
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 65535 (0 picks a free port), got {port}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def _check_device(device: str) -> None:
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")


def _check_positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


class Section:
    """Base of every config: validation runs for every section a config is made of. Each class validates its own
    fields in ``_validate``; ``__post_init__`` calls every class's, base sections first, so that a config that
    combines sections (``DoctorConfig(LogConfig, NetworkConfig)``) cannot skip one by the order of its bases."""

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):
            validate = klass.__dict__.get("_validate")
            if validate is not None:
                validate(self)


@dataclass(frozen=True)
class NetworkConfig(Section):
    """How a process listens on and joins the DHT (shared by bootstrap, peer and doctor)."""

    join: tuple[str, ...] = ()
    """Multiaddrs of live DHT peers to join through (the bootstrap's or any peer's), or the bootstrap's health URL
    (http://HOST:METRICS_PORT/healthz) to read them from; repeatable."""
    host: str = "0.0.0.0"
    """Interface to listen on for libp2p connections."""
    port: int = 0
    """TCP port to listen on; 0 picks a free one."""
    announce: tuple[str, ...] = ()
    """Multiaddrs announced to others instead of the listening ones (NAT, containers); explicit ports only."""
    identity: Path | None = None
    """Private key file; makes the peer id, and so the multiaddr, survive restarts. Created when missing."""
    client_mode: bool = False
    """Join as a client: reach out to others but accept no incoming connections (for hosts behind NAT)."""
    join_timeout: float = 30.0
    """Seconds to wait for the DHT to answer before giving up."""

    def _validate(self) -> None:
        _check_port("port", self.port)
        _check_positive("join_timeout", self.join_timeout)


@dataclass(frozen=True)
class LogConfig(Section):
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: str = "text"
    """text for people, json for log shippers."""

    def _validate(self) -> None:
        _check_choice("log_format", self.log_format, LOG_FORMATS)
        _check_choice("log_level", self.log_level.lower(), ("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class BootstrapConfig(LogConfig, NetworkConfig):
    """The bootstrap node: the first DHT peer everyone joins by its address."""

    port: int = 31337
    """TCP port to listen on (fixed by default so the join command stays the same); 0 picks a free one."""
    address_file: Path | None = None
    """Write the visible multiaddrs here, one per line (read by ``mesh up`` and scripts)."""
    metrics_port: int | None = None
    """Serve ``/healthz`` and ``/metrics`` on this HTTP port (0 picks one); off when unset."""

    def _validate(self) -> None:
        _check_port("metrics_port", self.metrics_port)


@dataclass(frozen=True)
class RunDefaults(Section):
    """Hyperparameters used when this peer creates a run; ignored when it joins an existing one."""

    batch_size: int | None = None
    """Samples per local step (the task's default when unset)."""
    target_batch_size: int | None = None
    """Samples accumulated across all peers before every peer steps: one epoch (the task's default when unset).
    With --averaging diloco an epoch (one outer step) is --inner-steps local steps per live peer instead."""
    optimizer: str | None = None
    """sgd, adam or adamw (the task's default when unset)."""
    lr: float | None = None
    """Learning rate (the task's default when unset)."""
    weight_decay: float = 0.0
    """Weight decay of the built-in optimizers (decoupled for adamw, L2 for sgd and adam)."""
    lr_schedule: str = "constant"
    """constant, linear or cosine: the learning rate by global epoch (the same on every peer, a late joiner
    included), after --warmup-epochs of linear warm-up; linear and cosine reach 0 at --total-epochs."""
    warmup_epochs: int = 0
    """Global epochs over which the learning rate rises linearly to --lr (0: none)."""
    total_epochs: int | None = None
    """The global epoch at which --lr-schedule linear or cosine reaches 0 (needed by them)."""
    clip_grad_norm: float | None = None
    """Clip the averaged gradient to this norm (over all parameters) before every optimizer step; off when unset."""
    averaging: str = "gradients"
    """gradients: average gradients every epoch; local: step locally and average parameters every epoch; diloco:
    step locally (the task's optimizer) for --inner-steps steps, then average the change of the parameters since
    the last outer step and apply it with Nesterov SGD (--outer-lr, --outer-momentum), for slow links."""
    inner_steps: int = 100
    """--averaging diloco: local optimizer steps per peer between outer steps (on average over the group: faster
    peers take more, slower ones fewer, so that all arrive together)."""
    outer_lr: float = 0.7
    """--averaging diloco: the outer optimizer's learning rate (Nesterov SGD; 0.7 as in the DiLoCo paper)."""
    outer_momentum: float = 0.9
    """--averaging diloco: the outer optimizer's Nesterov momentum, in [0, 1)."""
    compression: str = "none"
    """Wire format for averaged tensors: none, fp16 or 8bit."""
    aggregation: str = "mean"
    """How a group combines its members' gradients (or DiLoCo's pseudo-gradients): mean (weighted by samples), or
    clipped: each member's contribution is first bounded by the group's median contribution, shard by shard, so
    that one faulty admitted peer cannot blow up the others' step (docs/security.md). clipped needs the gloo data
    plane and --compression none."""
    matchmaking_time: float = 3.0
    """Seconds to wait for peers to form a group before each averaging round."""
    averaging_timeout: float = 30.0
    """Seconds before an averaging round is abandoned and the peer steps with its local gradients."""
    average_state_every: int = 10
    """Epochs between routine parameter averages (also done at once after a failed, partial or local-only round
    and when a peer joins); 1 averages parameters every epoch, as hivemind's default. A routine average is skipped
    when the gradient round before it, with every live peer in, found all members' parameters equal."""
    seed: int = 0
    """Seed of the model's initial parameters (every peer of the run starts from the same ones)."""

    def _validate(self) -> None:
        _check_positive("batch_size", self.batch_size)
        _check_positive("target_batch_size", self.target_batch_size)
        _check_positive("lr", self.lr)
        if self.optimizer is not None:
            _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("averaging", self.averaging, AVERAGING_MODES)
        check_schedule(self.lr_schedule, self.warmup_epochs, self.total_epochs, self.weight_decay, self.clip_grad_norm)
        if self.averaging == "diloco" and (self.lr_schedule != "constant" or self.warmup_epochs or self.clip_grad_norm):
            raise ConfigError("--lr-schedule, --warmup-epochs and --clip-grad-norm apply to gradient averaging, not --averaging diloco")
        _check_positive("inner_steps", self.inner_steps)
        _check_positive("outer_lr", self.outer_lr)
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"--outer-momentum must be in [0, 1), got {self.outer_momentum}")
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.aggregation == "clipped" and self.compression != "none":
            raise ConfigError("--aggregation clipped needs --compression none (it sends each member's shards in float32)")
        _check_positive("matchmaking_time", self.matchmaking_time)
        _check_positive("averaging_timeout", self.averaging_timeout)
        _check_positive("average_state_every", self.average_state_every)


@dataclass(frozen=True)
class PeerConfig(RunDefaults, LogConfig, NetworkConfig):
    """A training peer."""

    run: str = ""
    """The run to join (or create, when --task is given and nobody has created it); 'auto' (with --coordinator)
    joins the active run that most needs peers."""
    task: str | None = None
    """Built-in task name (regression, demo) or module:function; read from the run's record when unset."""
    task_arg: tuple[str, ...] = ()
    """KEY=VALUE passed to the task function as a keyword argument (VALUE read as JSON when it parses: 4, 0.1,
    true, "x"; else as text), checked against its signature; a config file's [task] table holds them too, and a
    flag wins over the file's entry of the same key."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N (several peers on one host, one GPU each)."""
    data_plane: str = "gloo"
    """How a matched group's gradients move: gloo (torch's process groups; fast), nccl (gloo, and the gradients on
    NCCL in a group whose members are each on their own CUDA device; not yet run on a GPU machine) or hivemind (its
    own all-reduce over libp2p). A group uses gloo only when every member offers it, NCCL only when every member
    offers it."""
    data_plane_host: str | None = None
    """Address the other members of a group reach this peer's data plane at (gloo and its rendezvous store use
    extra TCP ports); derived from --host, then --announce, then this host's addresses when unset."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast."""
    threads: int | None = None
    """torch intra-op threads (torch's default when unset); set it when several peers share one machine."""
    checkpoint_dir: Path | None = None
    """Write checkpoints here atomically and resume from the newest one at start."""
    checkpoint_every: int = 10
    """Epochs between checkpoints (one is always written on exit)."""
    eval_every: int = 10
    """Epochs between evaluations on held-out data (when the task has an evaluate function); 0: never."""
    tracker: tuple[str, ...] = ()
    """Experiment trackers, written every epoch: csv (metrics.csv), tensorboard, wandb; repeatable."""
    tracker_dir: Path | None = None
    """Folder of the trackers' files (--checkpoint-dir/trackers, else ./mesh-trackers/RUN, when unset)."""
    max_epochs: int | None = None
    """Leave the run after reaching this global epoch."""
    min_peers: int = 1
    """Before the first step, wait until this many peers (this one included) train the run."""
    min_peers_timeout: float = 300.0
    """Seconds to wait for --min-peers; then training starts with whoever is there."""
    status_file: Path | None = None
    """Write a JSON progress snapshot here after every epoch (read by ``mesh up``)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this HTTP port (0 picks one); off when unset."""
    log_every: float = 10.0
    """Seconds between progress log lines."""
    shutdown_timeout: float = 20.0
    """Seconds a graceful leave may take before the peer exits anyway."""
    min_step_time: float | None = None
    """Testing aid: each local step takes at least this many seconds (stands in for a slower model or device)."""
    fault_nan_step: int | None = None
    """Testing aid: make the local gradient NaN at this local step (it must be skipped, never sent)."""
    fault_nan_parameters_step: int | None = None
    """Testing aid: overwrite this peer's parameters with NaN before this local step (a local fault: the peer must
    take the run's state from its peers, or end with one line when none has a finite one)."""
    fault_gradient_scale: float | None = None
    """Testing aid: multiply every local gradient by this factor (a faulty peer, for --aggregation clipped)."""
    coordinator: str | None = None
    """Coordinator URL (http://host:8080): heartbeats go there, and without --join it hands out the bootstrap."""
    api_token: str | None = None
    """Bearer token for the coordinator's writes (when it has one)."""
    heartbeat_interval: float = 5.0
    """Seconds between heartbeats to the coordinator."""
    run_secret: str | None = None
    """The run's credential: only peers holding it can average, serve or download state, or write the run's
    records (docs/security.md). Set when the run is created; every peer of the run needs the same one. Prefer
    MESH_RUN_SECRET or the config file to the flag (a flag shows in `ps`). Unset: an open run."""

    def _validate(self) -> None:
        check_secret(self.run_secret)
        if not self.run:
            raise ConfigError("--run is required: the id of the run to join or create (e.g. --run demo)")
        validate_run_id(self.run)
        _check_device(self.device)
        _check_choice("data_plane", self.data_plane, DATA_PLANES)
        _check_positive("checkpoint_every", self.checkpoint_every)
        _check_positive("eval_every", self.eval_every, allow_zero=True)
        for name in self.tracker:
            _check_choice("tracker", name, TRACKERS)
        _check_positive("threads", self.threads)
        _check_positive("min_peers", self.min_peers)
        _check_positive("min_step_time", self.min_step_time)
        _check_positive("min_peers_timeout", self.min_peers_timeout)
        _check_positive("max_epochs", self.max_epochs)
        _check_positive("log_every", self.log_every)
        _check_positive("shutdown_timeout", self.shutdown_timeout)
        _check_port("metrics_port", self.metrics_port)
        _check_positive("heartbeat_interval", self.heartbeat_interval)
        if self.coordinator is not None and not self.coordinator.startswith(("http://", "https://")):
            raise ConfigError(f"--coordinator must be an http:// or https:// URL, got {self.coordinator!r}")


@dataclass(frozen=True)
class UpConfig(RunDefaults, LogConfig):
    """``mesh up``: a bootstrap node and N peers on this machine."""

    peers: int = 2
    """Number of local peers."""
    task: str = "demo"
    """Task the local peers train."""
    task_arg: tuple[str, ...] = ()
    """KEY=VALUE for the task function, passed to every local peer (as mesh peer --task-arg)."""
    run: str = "local"
    """Run id of the local mesh."""
    max_epochs: int | None = None
    """Stop everything after this global epoch (runs until Ctrl-C when unset)."""
    workdir: Path | None = None
    """Folder for identities, checkpoints, status files and logs (a temporary one when unset)."""
    device: str = "auto"
    """Device of the local peers."""
    threads_per_peer: int | None = None
    """torch threads per peer (cores / peers when unset)."""
    api_port: int = 8080
    """Port of the local coordinator and its status page (0 picks a free one)."""
    run_secret: str | None = None
    """The run's credential (docs/security.md); a new random one when unset, written to WORKDIR/run.secret."""
    open_run: bool = False
    """Create an open run (no secret): any process that can reach the bootstrap can then join it."""

    def _validate(self) -> None:
        check_secret(self.run_secret)
        if self.open_run and self.run_secret:
            raise ConfigError("--open-run and --run-secret contradict each other: pick one")
        _check_port("api_port", self.api_port)
        if not 1 <= self.peers <= 64:
            raise ConfigError(f"--peers must be between 1 and 64, got {self.peers}")
        _check_positive("max_epochs", self.max_epochs)
        _check_device(self.device)


@dataclass(frozen=True)
class DoctorConfig(LogConfig, NetworkConfig):
    """``mesh doctor``: preflight checks."""

    host: str = "0.0.0.0"
    join_timeout: float = 15.0
    """Seconds to wait for the bootstrap to answer."""


@dataclass(frozen=True)
class ApiConfig(LogConfig):
    """``mesh api``: the coordinator."""

    host: str = "0.0.0.0"
    """Interface the REST API and status page listen on."""
    port: int = 8080
    """HTTP port (0 picks a free one; the bound port is logged and written to --address-file)."""
    mongo_url: str | None = None
    """MongoDB URL (mongodb://...); without it the embedded store in --db-path is used."""
    mongo_database: str = "mesh"
    """MongoDB database name."""
    db_path: Path = Path("mesh-coordinator.db")
    """File of the embedded store (used when no --mongo-url is given)."""
    api_token: str | None = None
    """When set, every write needs 'Authorization: Bearer TOKEN'."""
    protect_reads: bool = False
    """Require the token for reads too."""
    bootstrap: tuple[str, ...] = ()
    """Bootstrap multiaddrs handed to peers that ask the coordinator how to join."""
    join: tuple[str, ...] = ()
    """Join the DHT through these multiaddrs (as a client) to watch it: peers that never heartbeat are seen too,
    and runs created here are published to the mesh."""
    observe_interval: float = 5.0
    """Seconds between reads of the DHT's run and peer records (with --join)."""
    heartbeat_interval: float = 5.0
    """Seconds between peer heartbeats; a peer silent for 3 intervals becomes lost."""
    max_body_bytes: int = 1_048_576
    """Largest accepted request body (413 above)."""
    address_file: Path | None = None
    """Write the coordinator's URL here once it listens."""
    run_secret_key: str | None = None
    """Hand each run's secret to peers that ask with the API token (GET /api/v1/runs/RUN/secret): the secret is
    derived from this key and the run id, so nothing secret is stored. Needs --api-token; serve over HTTPS."""

    def _validate(self) -> None:
        if self.run_secret_key is not None:
            if len(self.run_secret_key) < MIN_SECRET_LENGTH:
                raise ConfigError(f"--run-secret-key must be at least {MIN_SECRET_LENGTH} characters")
            if not self.api_token:
                raise ConfigError("--run-secret-key needs --api-token: without one, anybody could ask for a run's secret")
        _check_port("port", self.port)
        _check_positive("heartbeat_interval", self.heartbeat_interval)
        _check_positive("max_body_bytes", self.max_body_bytes)
        _check_positive("observe_interval", self.observe_interval)
        if self.mongo_url is not None and not self.mongo_url.startswith(("mongodb://", "mongodb+srv://")):
            scheme = self.mongo_url.split("://", 1)[0] + "://" if "://" in self.mongo_url else "no scheme"
            # not the URL itself: it may hold a password
            raise ConfigError(f"--mongo-url must start with mongodb:// or mongodb+srv://, got {scheme}")


@dataclass(frozen=True)
class StatusConfig(LogConfig):
    """``mesh status``: the coordinator's view, as tables."""

    coordinator: str = "http://127.0.0.1:8080"
    """Coordinator URL."""
    api_token: str | None = None
    """Bearer token, when the coordinator protects reads."""
    run: str | None = None
    """Show only this run (and its peers)."""
    output: str = "table"
    """table or json."""

    def _validate(self) -> None:
        _check_choice("output", self.output, ("table", "json"))
        if not self.coordinator.startswith(("http://", "https://")):
            raise ConfigError(f"--coordinator must be an http:// or https:// URL, got {self.coordinator!r}")


@dataclass(frozen=True)
class ExportConfig(LogConfig, NetworkConfig):
    """``mesh export``: a run's model as a safetensors file, from a peer's checkpoint or from the live mesh."""

    checkpoint_dir: Path | None = None
    """A peer's --checkpoint-dir: its newest checkpoint is exported."""
    run: str | None = None
    """With --join instead of --checkpoint-dir: the run whose newest state is fetched from its live peers (this
    process joins as a client and never trains)."""
    run_secret: str | None = None
    """The run's secret (a protected run's peers serve their state only to holders of it)."""
    out: Path | None = None
    """The safetensors file to write (run id, task, fingerprint and epoch go in its header)."""
    task: str | None = None
    """The task that builds the model; read from the checkpoint, or the run's record, when it names one."""
    task_arg: tuple[str, ...] = ()
    """KEY=VALUE for the task function, as the peers were given (mesh peer --task-arg)."""
    state_timeout: float = 60.0
    """With --join: seconds to wait for a live peer to serve the run's state."""

    def _validate(self) -> None:
        if (self.checkpoint_dir is None) == (not self.join):
            raise ConfigError("give --checkpoint-dir DIR (a peer's checkpoints) or --join ADDR --run RUN (the live mesh), one of them")
        if self.join and not self.run:
            raise ConfigError("--join needs --run: the run whose state to export")
        if self.out is None:
            raise ConfigError("--out is required: the .safetensors file to write")
        check_secret(self.run_secret)
        _check_positive("state_timeout", self.state_timeout)


C = TypeVar("C", bound="DataclassInstance")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a string (env var) or a file value into the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.replace(",", " ").split() if v.strip()]
        return tuple(str(v) for v in value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is Path:
            return Path(value).expanduser()
        return str(value) if hint is str else value
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{name} must be {kind}, got {value!r}") from None


def load_file(path: Path | None, section: str) -> dict[str, Any]:
    """Read a TOML or JSON config file; keys of the ``[section]`` table override top-level keys."""
    if path is None:
        return {}
    try:
        text = Path(path).read_bytes()
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text.decode())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {'JSON' if str(path).endswith('.json') else 'TOML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    sections = {"bootstrap", "peer", "up", "doctor", "api", "status", "export", "task"}
    merged = {k.replace("-", "_"): v for k, v in data.items() if k not in sections}
    task_table = data.get("task")
    if isinstance(task_table, dict) and section in ("peer", "up", "export"):  # the task function's keyword arguments
        merged["task_arg"] = tuple(f"{key}={json.dumps(value)}" for key, value in task_table.items())
    elif "task" in data and not isinstance(task_table, dict):
        merged["task"] = task_table
    table = data.get(section) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in config file {path} must be a table of settings")
    merged.update({k.replace("-", "_"): v for k, v in table.items()})
    return merged


def resolve(
    cls: type[C],
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    file: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from flags (None = not given) > ``MESH_*`` environment > file > the dataclass defaults."""
    env = os.environ if env is None else env
    file = file or {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) in config file: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = _field_type(cls, f.name)
        flag = flags.get(f.name)
        env_name = ENV_PREFIX + f.name.upper()
        if f.name in ADDITIVE_FIELDS and flag and f.name in file:
            values[f.name] = _coerce(file[f.name], hint, f"{f.name} in the config file") + _coerce(flag, hint, f.name)
        elif flag is not None and flag != ():
            values[f.name] = _coerce(flag, hint, "--" + f.name.replace("_", "-"))
        elif env.get(env_name) not in (None, ""):
            values[f.name] = _coerce(env[env_name], hint, env_name)
        elif f.name in file:
            values[f.name] = _coerce(file[f.name], hint, f"{f.name} in the config file")
    return cls(**values)


def parse_task_args(items: tuple[str, ...]) -> dict[str, Any]:
    """``--task-arg KEY=VALUE`` items as keyword arguments (a later item wins); VALUE as JSON when it parses."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"--task-arg must be KEY=VALUE with KEY a Python name, got {item!r}")
        try:
            args[key] = json.loads(text)
        except ValueError:
            args[key] = text
    return args


def describe(config: Any) -> str:
    """One log line with every resolved setting, secrets redacted."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in SECRET_FIELDS and value:
            value = "***"
        if isinstance(value, tuple):
            value = ",".join(value) or "-"
        parts.append(f"{f.name}={value}")
    return " ".join(parts)
