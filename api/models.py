"""The coordinator's data shapes: request bodies, stored documents and responses, as pydantic v2 models.

The handlers, the stores and the OpenAPI document all use these, so the document cannot drift from the code.
Times are timezone-aware UTC datetimes (ISO 8601 in JSON).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PEER_ID = r"^[1-9A-HJ-NP-Za-km-z]{20,128}$"  # base58, as libp2p prints peer ids

RunStatus = Literal["created", "running", "stopped", "finished", "failed"]
PeerStatus = Literal["alive", "left", "lost"]
Optimizer = Literal["sgd", "adam", "adamw", "task"]  # task: the task's own factory (mesh.tasks.Task.make_optimizer)
Compression = Literal["none", "fp16", "8bit"]
Averaging = Literal["gradients", "local", "diloco"]
Aggregation = Literal["mean", "clipped"]
LrSchedule = Literal["constant", "linear", "cosine"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Strict):
    """A run's hyperparameters. Unset (null) ``batch_size``, ``target_batch_size``, ``optimizer`` and ``lr`` mean the
    task's own defaults, as for ``mesh peer --task``: the coordinator fills them in when it can load the task, else
    the peer that creates the run's DHT record does."""

    batch_size: int | None = Field(None, ge=1, le=1_000_000, description="Samples per local step (null: the task's default)")
    target_batch_size: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Samples per epoch, over all peers (null: the task's default)"
    )
    optimizer: Optimizer | None = Field(None, description="null: the task's default")
    lr: float | None = Field(None, gt=0, le=10, description="null: the task's default")
    weight_decay: float = Field(0.0, ge=0, le=10, description="Weight decay of the built-in optimizers")
    lr_schedule: LrSchedule = Field("constant", description="constant, linear or cosine, by global epoch, after the warm-up")
    warmup_epochs: int = Field(0, ge=0, le=1_000_000, description="Epochs of linear warm-up to lr")
    total_epochs: int | None = Field(None, ge=1, le=1_000_000_000, description="Where linear and cosine reach 0")
    clip_grad_norm: float | None = Field(None, gt=0, le=1e6, description="Clip the averaged gradient to this norm (null: off)")
    averaging: Averaging = "gradients"
    compression: Compression = "none"
    aggregation: Aggregation = Field("mean", description="mean, or clipped: each member's contribution bounded by the median one")
    matchmaking_time: float = Field(3.0, gt=0, le=600)
    averaging_timeout: float = Field(30.0, gt=0, le=3600)
    average_state_every: int = Field(10, ge=1, le=1_000_000, description="Epochs between routine parameter averages")
    inner_steps: int = Field(100, ge=1, le=1_000_000, description="averaging diloco: local steps per peer between outer steps")
    outer_lr: float = Field(0.7, gt=0, le=10, description="averaging diloco: the outer Nesterov SGD's learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="averaging diloco: the outer Nesterov SGD's momentum")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _clipped_needs_float32(self) -> "Hyperparameters":
        if self.aggregation == "clipped" and self.compression != "none":
            raise ValueError("aggregation clipped needs compression none (it sends each member's shards in float32)")
        if self.lr_schedule != "constant" and (self.total_epochs is None or self.total_epochs <= self.warmup_epochs):
            raise ValueError(f"lr_schedule {self.lr_schedule} needs total_epochs above warmup_epochs")
        if self.averaging == "diloco" and (self.lr_schedule != "constant" or self.warmup_epochs or self.clip_grad_norm):
            raise ValueError("lr_schedule, warmup_epochs and clip_grad_norm apply to gradient averaging, not diloco")
        return self


class RunCreate(Strict):
    """Body of ``POST /api/v1/runs``."""

    run_id: str = Field(pattern=RUN_ID, description="Unique id; peers join with --run RUN_ID")
    task: str = Field(min_length=1, max_length=200, description="Built-in task name or module:function")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    min_peers: int = Field(1, ge=1, le=10_000, description="Peers the run wants at least (for --run auto); <= max_peers")
    max_peers: int = Field(64, ge=1, le=10_000, description="Peers the run accepts at most (for --run auto); >= min_peers")


class RunProgress(Strict):
    epoch: int = Field(0, ge=0)
    samples: int = Field(0, ge=0)
    loss: float | None = None
    samples_per_second: float = Field(0.0, ge=0)
    peers_alive: int = Field(0, ge=0)


class Run(RunCreate):
    """A run as stored and returned."""

    status: RunStatus = "created"
    created_at: datetime
    updated_at: datetime
    stopped_at: datetime | None = None
    progress: RunProgress = Field(default_factory=RunProgress)


class HistoryPoint(Strict):
    """One point per epoch per run (unique on run_id + epoch)."""

    run_id: str = Field(pattern=RUN_ID)
    epoch: int = Field(ge=0)
    loss: float | None = None
    eval_loss: float | None = Field(None, description="Loss on the task's held-out data (epochs with an evaluation)")
    lr: float | None = Field(None, ge=0, description="The learning rate the epoch stepped with")
    samples_per_second: float = Field(0.0, ge=0)
    peers: int = Field(0, ge=0)
    time: datetime


class Heartbeat(Strict):
    """Body of ``PUT /api/v1/peers/{peer_id}/heartbeat``: what a peer reports every interval."""

    run_id: str = Field(pattern=RUN_ID)
    task: str | None = Field(None, max_length=200, description="The run's task, so a run first seen here is recorded")
    addrs: list[str] = Field(default_factory=list, max_length=32)
    host: str = Field("", max_length=255)
    device: str = Field("", max_length=64)
    gpu_name: str | None = Field(None, max_length=255)
    version: str = Field("", max_length=64)
    epoch: int = Field(0, ge=0)
    samples_per_second: float = Field(0.0, ge=0)
    loss: float | None = None
    eval_loss: float | None = Field(None, description="Loss on the task's held-out data, when the peer evaluated at this epoch")
    lr: float | None = Field(None, ge=0, description="The peer's learning rate at this epoch")
    hyperparameters: dict[str, Any] | None = Field(
        None,
        max_length=64,
        description="The run's settings (as in Hyperparameters), so a run first seen here is recorded with them; "
        "settings outside this API's bounds are recorded as the defaults, never refused",
    )


class Peer(Strict):
    """A peer record as stored and returned."""

    peer_id: str = Field(pattern=PEER_ID)
    run_id: str = Field(pattern=RUN_ID)
    addrs: list[str] = Field(default_factory=list)
    host: str = ""
    device: str = ""
    gpu_name: str | None = None
    version: str = ""
    status: PeerStatus = "alive"
    joined_at: datetime
    last_seen: datetime
    left_at: datetime | None = None
    epoch: int = Field(0, ge=0)
    samples_per_second: float = Field(0.0, ge=0)
    loss: float | None = None
    source: Literal["heartbeat", "dht"] = "heartbeat"


class HeartbeatResponse(BaseModel):
    peer: Peer
    run_status: RunStatus
    newly_joined: bool


class Event(Strict):
    """Something that happened: a run created or stopped, a peer joined, left or was lost."""

    event_id: str
    run_id: str | None = None
    peer_id: str | None = None
    kind: str = Field(max_length=64)
    message: str = Field(max_length=1000)
    time: datetime


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class RunPage(Page):
    items: list[Run]


class PeerPage(Page):
    items: list[Peer]


class EventPage(Page):
    items: list[Event]


class HistoryList(BaseModel):
    items: list[HistoryPoint]


class Summary(BaseModel):
    runs: dict[str, int]
    peers: dict[str, int]
    bootstrap: list[str]
    version: str


class Bootstrap(BaseModel):
    addrs: list[str]


class RunSecret(BaseModel):
    run_id: str
    run_secret: str


class Health(BaseModel):
    status: str
    version: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict | list | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
