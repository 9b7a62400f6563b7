"""The data plane: once hivemind's matchmaking has decided *who* averages, the tensors move through torch's own
process groups (``ProcessGroupGloo``), not through hivemind's Python → p2pd → TCP all-reduce. The groups live in
the training process (:mod:`mesh.averager` runs the rounds there, :mod:`mesh.planeround`).

Every member hosts a ``TCPStore`` (one per peer, on a free port of the data-plane address) and publishes
``(host, port, last_group)`` in the group's gathered metadata. Members are ranked by sorted peer id (hivemind
shuffles its list every round; a sorted order lets a group with the same members reuse its process group); rank
0's store is the rendezvous, under a ``PrefixStore`` named after the membership and the round. The process group is
reused while the membership is unchanged and every member says it still holds it (``last_group``); a member whose
collective failed forgets it, so the next group that contains it rebuilds instead of reusing a broken one.

Every round begins with :func:`exchange`: one all-gather of a short float64 vector per member (its weight, epoch,
pace, batch, live count, flags). It is the round's arrival barrier and gives every member the same table, from
which each takes the same decisions (the share of each member, whether the group is settled).

Weighted averaging (hivemind's weights are samples accumulated), with each member's share ``w/W`` of the summed
weight known from the exchange. In a standing round the share is folded into the copy of the accumulated gradients
into the averaging buffer (:func:`load_scaled_`, the pass hivemind makes anyway to divide by the number of
accumulation steps), so the all-reduce that follows sums the buffer as it is (``share`` 1); a matched round's buffer
is loaded before its group is known, so it is scaled by ``share`` on the way:
- ``none``: an all-reduce (SUM) of ``x·w/W`` (in 16 MB chunks when it scales on the way: :func:`sum_`).
- ``fp16``: one fp16 all-reduce of ``x·w/W`` (the summands are shares of a mean, so they cannot overflow fp16 the
  way raw ``w·x`` could).
- ``8bit``: quantized tensors cannot be summed on the wire, so each member all-gathers every member's tensors as
  hivemind's own codec encodes them (Uniform8Bit for big tensors, fp16 for small ones) and averages them locally,
  in the same order on every member, so all members get the same result. Traffic per member: (n-1) · 1 byte per
  value, which is less than fp32's ring all-reduce for groups of up to 8.

A protected run's rendezvous is authenticated (docs/security.md): TCPStore has no access control (any process that
reaches a store's port can list, read and write its keys: ``list_keys`` is public API), and gloo's addresses in it
are all a process needs to connect to the members. So under a run secret the rendezvous goes through a
:class:`SealedStore` (key names hashed, values encrypted and authenticated with keys derived from the run's key), and
once built, every pair of members proves over its own connection that it holds the run's key
(:func:`verify_pairs`) before any tensor moves.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import socket
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from torch.distributed.distributed_c10d import AllgatherOptions

from mesh.admission import Admission

CHUNK_ELEMENTS = 2**22  # 16 MB of float32 per collective


@dataclass(frozen=True)
class Endpoint:
    """What a member publishes to its group: where its store listens, which group it last averaged in, and the GPU
    it offers NCCL on (empty: none)."""

    host: str
    port: int
    last_group: int  # digest of the member's cached process group (0: none)
    gpu: str = ""  # the CUDA device's identity (gpu_identity) when the member offers NCCL

    def to_wire(self) -> list:
        return [self.host, self.port, self.last_group, self.gpu]

    @classmethod
    def from_wire(cls, value: object) -> "Endpoint | None":
        if isinstance(value, (list, tuple)) and len(value) in (3, 4):
            host, port, last, gpu = (*value, "")[:4]
            if isinstance(host, str) and isinstance(gpu, str) and all(type(v) is int for v in (port, last)) and 0 < port < 65536:
                return cls(host, port, last, gpu)
        return None


def membership(members: Sequence[tuple[bytes, Endpoint]]) -> tuple:
    """The group's identity: who, at which store (a member that restarted has a new one), on which GPU."""
    return tuple((peer, e.host, e.port, e.gpu) for peer, e in sorted(members, key=lambda item: item[0]))


def nccl_usable(endpoints: Sequence[Endpoint]) -> bool:
    """Whether a group's gradients can move on NCCL: every member offers a GPU, and no two the same one (NCCL refuses
    two ranks of one communicator on one device)."""
    gpus = [e.gpu for e in endpoints]
    return len(gpus) > 1 and all(gpus) and len(set(gpus)) == len(gpus)


def gpu_identity(device: torch.device) -> str:
    """A CUDA device's identity across processes and hosts: its UUID (the same GPU seen from two processes, even
    under different indices, gives the same one)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else f"{socket.gethostname()}/{device}"  # an older torch: host and index


def nccl_error_handling() -> None:
    """NCCL's defaults tear the whole process down when a collective times out or fails
    (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``), and ``wait()`` only orders the GPU stream: a member that died would kill
    its group's survivors, or hand them a half-reduced buffer as done. Abort the communicator only, and make
    ``wait()`` block and raise (set before the first NCCL process group; a user's own setting wins)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")


def digest(key: tuple) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little") or 1


class StoreHost:
    """This member's TCPStore server (the rendezvous when it is a group's rank 0), listening on ``host`` only."""

    def __init__(self, host: str, timeout: float) -> None:
        self.host = host
        # TCPStore's own server listens on every interface; hand it a socket bound to the data-plane address
        listener = socket.create_server((host, 0), backlog=128)
        self.port = listener.getsockname()[1]
        self.store = dist.TCPStore(
            host,
            self.port,
            is_master=True,
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
            timeout=datetime.timedelta(seconds=timeout),
        )

    def close(self) -> None:
        """Stop the server (its thread) and free the port (the store owns the listening socket)."""
        del self.store


class SealedStore(dist.Store):
    """A store only the holders of ``key`` can use: what gloo (and NCCL) put in it is encrypted and authenticated
    (AES-GCM, bound to the key's name), and key names are hashed, so a process connected to the TCPStore below sees
    opaque names and ciphertext, and anything it writes or moves between names fails to open (counted in
    ``forged``; the build that read it fails). Counters (``add``) are not sealed: a writer can only disturb them,
    and gloo's and NCCL's rendezvous read values, not counters."""

    def __init__(self, inner: dist.Store, key: bytes) -> None:
        super().__init__()
        self._inner = inner
        self._names = hmac.new(key, b"store names", hashlib.sha256).digest()
        self._cipher = AESGCM(hmac.new(key, b"store values", hashlib.sha256).digest())
        self.forged = 0

    def _name(self, key: str) -> str:
        return "sealed/" + hmac.new(self._names, key.encode(), hashlib.sha256).hexdigest()[:40]

    def set(self, key: str, value: bytes | str) -> None:
        name, nonce = self._name(key), os.urandom(12)
        plain = value.encode() if isinstance(value, str) else bytes(value)
        self._inner.set(name, nonce + self._cipher.encrypt(nonce, plain, name.encode()))

    def get(self, key: str) -> bytes:
        name = self._name(key)
        sealed = bytes(self._inner.get(name))
        try:
            return self._cipher.decrypt(sealed[:12], sealed[12:], name.encode())
        except (InvalidTag, ValueError):
            self.forged += 1
            raise RuntimeError(f"data-plane rendezvous: the value of {key!r} was not written by a member of the run") from None

    def wait(self, keys: list[str], *timeout: datetime.timedelta) -> None:
        self._inner.wait([self._name(k) for k in keys], *timeout)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check([self._name(k) for k in keys])

    def add(self, key: str, amount: int) -> int:
        return self._inner.add(self._name(key), amount)

    def delete_key(self, key: str) -> bool:
        return self._inner.delete_key(self._name(key))

    def num_keys(self) -> int:
        return self._inner.num_keys()

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._inner.set_timeout(timeout)


def pair_tag(key: bytes, round_id: bytes, sender: bytes, receiver: bytes) -> bytes:
    """What ``sender`` proves to ``receiver`` over their connection in the group formed as ``round_id``."""
    mac = hmac.new(key, b"data-plane pair\0", hashlib.sha256)
    for part in (round_id, sender, receiver):
        mac.update(len(part).to_bytes(8, "big") + part)
    return mac.digest()


def verify_pairs(group: dist.ProcessGroup, peers: Sequence[bytes], key: bytes, round_id: bytes) -> list[int]:
    """Every member sends every other one, point to point (over the very connection later collectives use), a tag
    only holders of ``key`` can compute for this group, sender and receiver; returns the ranks whose tag was wrong.
    A process that got into the group by racing a member's connection to a gloo port cannot pass it."""
    rank = group.rank()
    works, received = [], {}
    for other in range(group.size()):
        if other == rank:
            continue
        tag = torch.frombuffer(bytearray(pair_tag(key, round_id, peers[rank], peers[other])), dtype=torch.uint8)
        received[other] = torch.zeros(32, dtype=torch.uint8)
        works += [group.send([tag], other, 0), group.recv([received[other]], other, 0)]
    for work in works:
        work.wait()
    return [
        other
        for other, got in received.items()
        if not hmac.compare_digest(bytes(got.tolist()), pair_tag(key, round_id, peers[other], peers[rank]))
    ]


class GroupCache:
    """The process group of the last membership this member averaged in.

    A member reuses it only when every member says (``Endpoint.last_group``) that it holds the very same group:
    the decision is taken from the gathered metadata every member sees, so either all reuse or all rebuild. A
    member whose collective failed forgets its group, so the next group it is in rebuilds.

    Under a protected run's ``admission`` the rendezvous is sealed and every pair verified (see the module's
    docstring); a build that meets a forged value or a wrong tag raises, and counts a ``rendezvous`` refusal."""

    def __init__(self, local_host: str, timeout: float, admission: Admission | None = None) -> None:
        self.local_host = local_host
        self.timeout = datetime.timedelta(seconds=timeout)
        self.admission = admission or Admission("")
        self._store_key = self.admission.subkey("data-plane store")
        self._pair_key = self.admission.subkey("data-plane pairs")
        self._key: tuple | None = None
        self._group: dist.ProcessGroup | None = None
        self.nccl: dist.ProcessGroup | None = None  # the same members on NCCL, when every member offers a GPU
        # the group's store, held while the group lives: NCCL reads it at its first collective, and a store written
        # in Python (SealedStore) lives only as long as a Python reference to it does
        self._store: dist.Store | None = None
        self.builds = 0

    @property
    def current(self) -> int:
        """Digest of the cached group (0: none), for this member's next Endpoint."""
        return digest(self._key) if self._key is not None else 0

    def get(self, members: Sequence[tuple[bytes, Endpoint]], me: bytes, round_id: bytes) -> tuple[dist.ProcessGroup, int]:
        """The process group of ``members`` (peer id bytes, endpoint), reused or built; and this member's rank.
        ``round_id`` (hivemind's group id, the same for every member) names a new group's keys in the store, so a
        rebuild never meets the keys of an earlier build."""
        ordered = sorted(members, key=lambda item: item[0])
        rank = [peer for peer, _ in ordered].index(me)
        key = membership(ordered)
        everyone_holds_it = all(endpoint.last_group == digest(key) for _, endpoint in ordered)
        if not (everyone_holds_it and key == self._key and self._group is not None):
            self.drop()
            self._group, self.nccl = self._build(ordered, rank, round_id)
            self._key = key
            self.builds += 1
        return self._group, rank

    def _build(
        self, ordered: Sequence[tuple[bytes, Endpoint]], rank: int, round_id: bytes
    ) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
        root = ordered[0][1]
        prefix = hashlib.sha256(repr(membership(ordered)).encode() + round_id).hexdigest()[:32]
        client: dist.Store = dist.TCPStore(root.host, root.port, is_master=False, timeout=self.timeout)
        sealed = SealedStore(client, self._store_key) if self._store_key is not None else None
        store = self._store = sealed if sealed is not None else client
        options = dist.ProcessGroupGloo._Options()
        options._timeout = self.timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.local_host)]
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, len(ordered), options)
        except Exception:
            if sealed is not None and sealed.forged:
                self.admission.refuse("rendezvous", ordered[0][0].hex()[:16], detail="a forged value in the data plane's store")
            raise
        if self._pair_key is not None:
            peers = [peer for peer, _ in ordered]
            impostors = verify_pairs(group, peers, self._pair_key, round_id)
            for bad in impostors:
                self.admission.refuse("rendezvous", peers[bad].hex()[:16], detail="a data-plane connection without the run's key")
            if impostors:
                raise RuntimeError(f"data-plane rendezvous: the connections of ranks {impostors} do not hold the run's key")
        nccl = None
        if nccl_usable([endpoint for _, endpoint in ordered]):
            nccl_error_handling()
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = self.timeout
            nccl = dist.ProcessGroupNCCL(dist.PrefixStore(prefix + "/nccl", store), rank, len(ordered), nccl_options)
        return group, nccl

    def drop(self) -> None:
        self._key, self._group, self.nccl, self._store = None, None, None, None


def flat_views(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One contiguous float32 buffer and views of it shaped like ``tensors`` (filled from them): averaged in place,
    with no copy in or out. In shared memory (hivemind's averager process reads it) unless on a ``device``."""
    flat = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32, device=device)
    if device is None:
        flat.share_memory_()
    views, offset = [], 0
    for t in tensors:
        view = flat[offset : offset + t.numel()].view(t.shape)
        view.copy_(t.detach())
        views.append(view)
        offset += t.numel()
    return flat, views


def load_scaled_(views: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], scale: float) -> None:
    """``views[i] = sources[i] · scale``, one pass per tensor (no copy, then a scaling pass over the copy); a
    source on another device or of another dtype (accumulators on a GPU, the buffer in host memory) is copied
    first, then scaled, as hivemind does."""
    for view, source in zip(views, sources):
        if source.device == view.device and source.dtype == view.dtype:
            torch.mul(source, scale, out=view)
        else:
            view.copy_(source, non_blocking=True).mul_(scale)


def load_difference_(
    views: Sequence[torch.Tensor], minuends: Sequence[torch.Tensor], subtrahends: Sequence[torch.Tensor], scale: float
) -> None:
    """``views[i] = (minuends[i] - subtrahends[i]) · scale``: one subtraction into the view, then the scale (none
    when it is 1); operands on another device or of another dtype are brought to the view's first. Outside autograd
    (the operands are often parameters; the data-plane thread runs with grad mode on, as every new thread does)."""
    with torch.no_grad():
        for view, minuend, subtrahend in zip(views, minuends, subtrahends, strict=True):
            torch.sub(minuend.to(view.device, view.dtype), subtrahend.to(view.device, view.dtype), out=view)
            if scale != 1.0:
                view.mul_(scale)


def finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, in one read of each (no temporaries): a sum is NaN or ±inf if
    any summand is (or if finite values sum beyond float32's range, which counts as non-finite too). Summed in
    float32 whatever the dtype. Note: a CPU-GPU sync point on CUDA."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all())


def exchange(group: dist.ProcessGroup, values: Sequence[float], timeout: float | None = None) -> list[list[float]]:
    """Every member's ``values`` (the same length on every member), in rank order: one all-gather, which waits for
    the last member at most ``timeout`` seconds (else the group's own timeout); past it, it raises."""
    mine = torch.tensor(list(values), dtype=torch.float64)
    rows = [torch.zeros_like(mine) for _ in range(group.size())]
    options = AllgatherOptions()
    if timeout is not None:
        options.timeout = datetime.timedelta(seconds=timeout)
    group.allgather([rows], [mine], options).wait()
    return [row.tolist() for row in rows]


def sum_(group: dist.ProcessGroup, flat: torch.Tensor, share: float = 1.0) -> None:
    """All-reduce (SUM) ``flat`` in place, each member's multiplied by its ``share`` first. With a share to apply,
    in 16 MB chunks, chunk k+1 scaled while chunk k is on the wire (the scaling pass cost ~20 % of a 25M all-reduce
    otherwise); without one, in one collective (against 16 MB chunks: 0.88-0.94 -> 1.01-1.03 of a bare copy-then-SUM
    in groups of 4 at 25M, ``tests/bench/allreduce.py``, docs/performance.md)."""
    if share == 1.0:
        group.allreduce([flat]).wait()
        return
    for work in [group.allreduce([chunk.mul_(share)]) for chunk in flat.split(CHUNK_ELEMENTS)]:
        work.wait()


def average_(
    group: dist.ProcessGroup,
    tensors: Sequence[torch.Tensor],
    flat: torch.Tensor,
    share: float,
    compression: str,
    codec: CompressionBase | None = None,
) -> None:
    """Replace ``tensors`` in place by the weighted mean of every member's, given this member's ``share`` of the
    group's summed weight (from :func:`exchange`; 1 when the buffer already holds ``x·w/W``, :func:`load_scaled_`);
    they are views of the one contiguous float32 buffer ``flat`` (see :func:`flat_views`), which is reduced in
    place.

    Note: the tensors are undefined if a collective fails midway; the caller falls back to its own copy."""
    if compression == "none":
        sum_(group, flat, share)
    elif compression == "fp16":
        half = (flat if share == 1.0 else flat.mul(share)).to(torch.float16)
        group.allreduce([half]).wait()
        flat.copy_(half)
    elif compression == "8bit":
        flat.copy_(_gathered_mean(group, tensors, share, codec))
    else:
        raise ValueError(f"unknown compression {compression!r}")


def _gathered_mean(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], share: float, codec: CompressionBase | None) -> torch.Tensor:
    assert codec is not None, "8bit needs hivemind's codec"
    encoded = [codec.compress(t.detach().cpu(), CompressionInfo.from_tensor(t, key=i)).SerializeToString() for i, t in enumerate(tensors)]
    payload = b"".join(len(item).to_bytes(8, "little") + item for item in encoded)
    # every member's payload, and its share of the mean, travel together: [share (8 bytes) | length-prefixed parts]
    message = torch.frombuffer(bytearray(torch.tensor([share], dtype=torch.float64).numpy().tobytes() + payload), dtype=torch.uint8)
    size = torch.tensor([message.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size())]
    group.allgather([sizes], [size]).wait()
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: message.numel()] = message
    received = [torch.zeros(longest, dtype=torch.uint8) for _ in range(group.size())]
    group.allgather([received], [padded]).wait()
    mean = None
    for blob, length in zip(received, sizes):
        data = blob[: int(length.item())].numpy().tobytes()
        member_share = float(torch.frombuffer(bytearray(data[:8]), dtype=torch.float64)[0])
        parts, offset = [], 8
        while offset < len(data):
            n = int.from_bytes(data[offset : offset + 8], "little")
            parts.append(deserialize_torch_tensor(runtime_pb2.Tensor.FromString(data[offset + 8 : offset + 8 + n])))
            offset += 8 + n
        contribution = torch.cat([p.reshape(-1).to(torch.float32) for p in parts])
        if member_share != 1.0:
            contribution.mul_(member_share)
        mean = contribution if mean is None else mean.add_(contribution)
    return mean


OUTLIER_FACTOR = 2.0  # a contribution whose shard is this many times the median's is counted as an outlier


def clipped_mean_(group: dist.ProcessGroup, flat: torch.Tensor, shares: Sequence[float]) -> int:
    """``--aggregation clipped``: replace ``flat`` (this member's contribution times its share of the group's
    weight) by the weighted mean of every member's contribution, each clipped to the median contribution's norm.

    The buffer is cut into one shard per member; each member receives every member's part of its own shard (one
    all-to-all), so every contribution is seen whole by an honest owner, never summed away first. The owner scales
    each member's part by ``min(1, median / norm)``, where ``norm`` is that part's norm over the member's share
    (the contribution itself) and ``median`` the lower median of those norms among members with weight, and sums
    the scaled parts into its shard of ``flat``. Every member then has all shards through one all-reduce of the
    buffer with the other shards zeroed (exact: each value is one shard's plus zeros; gloo's all-gather took
    longer here). A member's whole contribution is bounded shard by shard (as CenteredClip in arXiv 2106.11257
    bounds each part). Returns how many parts were outliers (norm above ``OUTLIER_FACTOR`` times the median)."""
    members, rank, size = group.size(), group.rank(), flat.numel()
    step = -(-size // members)
    edges = [min(i * step, size) for i in range(members + 1)]
    sizes = [edges[i + 1] - edges[i] for i in range(members)]
    received = torch.empty(members * sizes[rank], dtype=flat.dtype)
    group.alltoall_base(received, flat, [sizes[rank]] * members, sizes, dist.AllToAllOptions()).wait()
    parts = received.view(members, sizes[rank])  # row i: member i's part of this member's shard
    weights = torch.tensor(list(shares), dtype=torch.float64)
    live = weights > 0
    norms = torch.linalg.vector_norm(parts, dim=1).double()
    contribution_norms = torch.where(live, norms / weights.clamp(min=1e-300), torch.zeros_like(norms))
    own = flat[edges[rank] : edges[rank + 1]]
    own.zero_()
    outliers = 0
    if live.any():
        bound = contribution_norms[live].median()  # the lower median: of two members, the smaller one
        outliers = int(((contribution_norms > OUTLIER_FACTOR * bound) & live).sum())
        for part, norm in zip(parts, contribution_norms.tolist()):
            own.add_(part, alpha=min(1.0, float(bound) / norm) if norm > 0 else 1.0)
    flat[: edges[rank]].zero_()
    flat[edges[rank + 1] :].zero_()
    sum_(group, flat)
    return outliers
