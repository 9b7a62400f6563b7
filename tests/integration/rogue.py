"""An attacker with plain hivemind (no mesh code): it knows the bootstrap's address and the run id, which anyone can
list from the DHT. Run as ``python -m tests.integration.rogue JOIN RUN SECONDS``; prints one JSON line saying what
it tried and what it got.

What it does, everything an outsider can do without the run's secret:
1. forges the run's record: overwrites every copy it can list with a huge learning rate and a later expiration,
   and adds copies of its own (open, and "signed" with a made-up signature);
2. calls the averaging RPCs of every peer it can list, at the names an open run of that id has (with the mesh's
   class names, which are public), asking to join a group and to download the state;
3. trains with ``hivemind.Optimizer`` on that run id and the model's shapes, sending gradients of 1e6 and
   reporting progress, for ``SECONDS``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from functools import partial

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

HUGE = 1e6


class MeshGradientAverager(GradientAverager):
    """Named as the mesh's: hivemind names each RPC handler after the averager's class."""


class MeshStateAverager(TrainingStateAverager):
    pass


def forge_records(dht: hivemind.DHT, run: str) -> dict:
    listed = dht.get("mesh_runs", latest=True)
    copies = {subkey: item.value for subkey, item in (listed.value.items() if listed else []) if str(subkey).startswith(run)}
    later = get_dht_time() + 3600
    overwrites = 0
    for subkey, value in copies.items():
        forged = {**value, "lr": HUGE}
        overwrites += bool(dht.store("mesh_runs", subkey=subkey, value=forged, expiration_time=later))
    template = {**next(iter(copies.values())), "lr": HUGE} if copies else None
    added = 0
    if template is not None:
        own = run + RSASignatureValidator().local_public_key.decode()
        added += bool(dht.store("mesh_runs", subkey=own, value={**template, "signature": "0" * 64}, expiration_time=later))
        added += bool(dht.store("mesh_runs", subkey=run, value={**template, "signature": None}, expiration_time=later))
    return {"copies_seen": len(copies), "overwrites_accepted": overwrites, "copies_added": added}


def honest_peers(dht: hivemind.DHT, run: str) -> list[PeerID]:
    listed = dht.get("mesh_peers", latest=True)
    peers = []
    for subkey, item in listed.value.items() if listed else []:
        if isinstance(item.value, dict) and item.value.get("run_id") == run:
            peers.append(PeerID.from_base58(str(subkey).split("[owner:", 1)[0]))
    return peers


async def probe(dht: hivemind.DHT, run: str, peers: list[PeerID]) -> dict:
    p2p = await dht.replicate_p2p()
    answers = {"join": [], "download": []}
    for peer in peers:
        for prefix, cls in ((f"{run}_grad_averager", MeshGradientAverager), (f"{run}_state_averager", MeshStateAverager)):
            stub = cls.get_stub(p2p, peer, namespace=prefix)
            try:
                request = averaging_pb2.JoinRequest(schema_hash=b"x", expiration=get_dht_time() + 5, group_key=f"{prefix}.0b")
                codes = [averaging_pb2.MessageCode.Name(m.code) async for m in await stub.rpc_join_group(request)]
                answers["join"].append(codes)
            except Exception as err:
                answers["join"].append(type(err).__name__)
            try:
                parts = [m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]
                answers["download"].append(len(parts))
            except Exception as err:
                answers["download"].append(type(err).__name__)
    return answers


def main(join: str, run: str, seconds: float) -> None:
    # hivemind's signature validator: its own "owned" copies are signed, as an honest node's would be
    dht = hivemind.DHT(initial_peers=[join], host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RSASignatureValidator()], start=True)
    report: dict = {"records": forge_records(dht, run)}
    peers = honest_peers(dht, run)
    report["peers_seen"] = len(peers)
    report["probes"] = asyncio.run(probe(dht, run, peers))
    print("forged and probed", flush=True)
    model = torch.nn.Linear(16, 4)  # the regression task's shapes
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=run,
        params=model.parameters(),
        optimizer=partial(torch.optim.SGD, lr=1.0),
        target_batch_size=512,
        batch_size_per_step=16,
        matchmaking_time=1.0,
        averaging_timeout=10.0,
        grad_averager_factory=MeshGradientAverager,
        verbose=False,
    )
    steps, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for param in model.parameters():
            param.grad = torch.full_like(param, HUGE)
        opt.step(batch_size=16)
        steps += 1
        time.sleep(0.05)
    report["steps"], report["epoch"] = steps, opt.local_epoch
    print(json.dumps(report), flush=True)
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
