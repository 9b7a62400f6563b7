"""Admission on hivemind's averaging paths (the rules are :mod:`mesh.admission`'s).

:class:`AdmittedAverager` sits between hivemind's averager classes and ``DecentralizedAverager``
(``class MeshStateAverager(..., TrainingStateAverager, AdmittedAverager)``), so that hivemind's own ``super()``
calls pass through it; it overrides only public methods (the RPCs, ``step``, ``get_current_state``,
``load_state_from_peers``, ``add_p2p_handlers``) and the extension point ``_aggregate_with_group``:

- **matchmaking, as leader**: a join request whose gathered metadata holds no valid ticket for the requester's
  peer id (authenticated by libp2p) is refused;
- **matchmaking, as follower**: a group the leader formed is averaged only if every member's ticket is valid, so
  an admitted peer neither follows an unadmitted leader nor averages with an unadmitted member;
- **state serving**: a download is served only to a peer whose presence in the run is signed with the run's key;
- **state download**: the state a donor serves carries a MAC over its metadata and every tensor; a download whose
  MAC does not verify is discarded (hivemind then tries again later, as after any failed download);
- **the run's public name**: a protected run's averagers also answer at the names an open run of the same id would
  use, refusing and counting every request there, so an outsider's attempts show on the peers it tried.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer

from mesh.admission import Admission
from mesh.records import PEERS_KEY, parse_peers

TICKET = "ticket"
STATE_MAC = "mesh_state_mac"
ADMITTED_TTL = 60.0  # seconds a peer found admitted (signed presence) stays admitted without another lookup


def gathered_ticket(serializer: Any, blob: bytes) -> Any:
    """The ticket in a member's gathered metadata (hivemind packs it as [bandwidth, mode, user bytes])."""
    try:
        _bandwidth, _mode, user = serializer.loads(blob)
        data = serializer.loads(user)
    except Exception:
        return None
    return data.get(TICKET) if isinstance(data, dict) else None


def state_mac(admission: Admission, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
    """A MAC of a served state: its metadata (as hivemind serializes it) and every tensor's dtype, shape and bytes."""
    parts = [MSGPackSerializer.dumps(metadata)]
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        parts.append(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        parts.append(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return admission.mac("state", *parts)


def handle_name(namespace: str, class_name: str, method: str) -> str:
    """hivemind's name of an RPC handler (``ServicerBase._get_handle_name``; pinned in test_hivemind_api)."""
    return f"{namespace}::{class_name}.{method}"


class SignedState:
    """The state served to a joiner, with its MAC (the download side checks it: ``AdmittedAverager``). A mixin put
    *before* hivemind's averager class, whose ``get_current_state`` builds the state without calling ``super()``."""

    admission: Admission

    def get_current_state(self):
        if not self.admission.protected:
            return super().get_current_state()
        # hivemind serves the live tensors (a CPU parameter's .cpu() is itself), which the next optimizer step
        # changes while they stream: the MAC must cover what is sent, so send a copy taken between steps
        with getattr(self, "lock_optimizer", None) or contextlib.nullcontext():
            metadata, tensors, infos = super().get_current_state()
            tensors = [tensor.detach().clone() for tensor in tensors]
        return {**metadata, STATE_MAC: state_mac(self.admission, metadata, tensors)}, tensors, infos


class AdmittedAverager(DecentralizedAverager):
    """hivemind's averager with the run's admission on every path (see the module's docstring)."""

    def __init__(self, *args: Any, admission: Admission | None = None, **kwargs: Any) -> None:
        self.admission = admission or Admission("")
        self._admitted: dict[PeerID, float] = {}  # peer -> until when it counts as admitted (averager's process)
        self._checked_group: bytes | None = None
        super().__init__(*args, **kwargs)

    # ---- host side ----

    def step(self, gather: Any = None, **kwargs: Any):
        """hivemind's step, with this peer's ticket in the metadata its group gathers."""
        if self.admission.protected:
            ticket = self.admission.ticket(self.dht.peer_id.to_bytes())
            gather = {**gather, TICKET: ticket} if isinstance(gather, dict) else {"gather": gather, TICKET: ticket}
        return super().step(gather=gather, **kwargs)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        loaded = super().load_state_from_peers(wait=wait, timeout=timeout)
        if loaded is None or not self.admission.protected:
            return loaded
        metadata, tensors = loaded
        mac = metadata.pop(STATE_MAC, None) if isinstance(metadata, dict) else None
        if not isinstance(mac, str) or mac != state_mac(self.admission, metadata, tensors):
            self.admission.refuse("state", detail="downloaded state is unsigned or its signature does not verify; discarded")
            return None
        return metadata, tensors

    # ---- the averager's process ----

    def check_group(self, group_info: GroupInfo) -> None:
        """Raise (the round fails) when some member of the group holds no valid ticket; each group checked once."""
        if not self.admission.protected or self._checked_group == group_info.group_id:
            return
        for peer_id, blob in zip(group_info.peer_ids, group_info.gathered):
            if not self.admission.admits(peer_id.to_bytes(), gathered_ticket(self.serializer, blob)):
                self.admission.refuse("group", peer_id, detail="a member of the group it formed has no valid ticket")
                raise MatchmakingException(f"group refused: member {peer_id} is not admitted to the run")
        self._checked_group = group_info.group_id

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any):
        self.check_group(group_info)
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not self.admission.admits(context.remote_id.to_bytes(), gathered_ticket(self.serializer, request.gather)):
            self.admission.refuse("ticket", context.remote_id, detail="matchmaking request without a valid ticket")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self.admission.protected and not await self._is_admitted(context.remote_id):
            self.admission.refuse("download", context.remote_id, detail="state requested by a peer with no signed presence in the run")
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _is_admitted(self, peer: PeerID) -> bool:
        now = time.monotonic()
        if self._admitted.get(peer, 0.0) > now:
            return True
        raw = await self.dht.get(PEERS_KEY, latest=True, return_future=True)
        for peer_id in parse_peers(raw, self.admission.run_id, self.admission):
            self._admitted[PeerID.from_base58(peer_id)] = now + ADMITTED_TTL
        return self._admitted.get(peer, 0.0) > now

    async def add_p2p_handlers(self, p2p: P2P, wrapper: Any = None, *, namespace: str | None = None, balanced: bool = False) -> None:
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        if self.admission.protected and wrapper is None and namespace is not None:
            public = self.admission.public_name(namespace)
            if public != namespace:
                await self._add_public_refusals(p2p, public)

    async def _add_public_refusals(self, p2p: P2P, public: str) -> None:
        """Handlers at the run's public name (as every averager class of this one's lineage names them) that refuse
        and count: an outsider knows the run id, so it tries these."""
        admission = self.admission

        def refusing(method: str, reply: Any):
            async def handler(request: Any, context: P2PContext):
                admission.refuse("unadmitted", context.remote_id, detail=f"{method} at the run's public name (no run secret)")
                if reply is not None:
                    yield reply

            return handler

        methods = (
            ("rpc_join_group", averaging_pb2.JoinRequest, False, averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)),
            ("rpc_download_state", averaging_pb2.DownloadRequest, False, None),
            ("rpc_aggregate_part", averaging_pb2.AveragingData, True, averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)),
        )
        lineage = {cls.__name__ for cls in type(self).__mro__ if issubclass(cls, DecentralizedAverager) and cls is not AdmittedAverager}
        for class_name in sorted(lineage):
            for method, request_type, stream_input, reply in methods:
                await p2p.add_protobuf_handler(
                    handle_name(public, class_name, method),
                    refusing(method, reply),
                    request_type,
                    stream_input=stream_input,
                    stream_output=True,
                )
