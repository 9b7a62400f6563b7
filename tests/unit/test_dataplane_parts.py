"""The data plane's small parts, without a network: the endpoint's wire form, the reuse rule, the address choice,
and the progress-report throttle."""

from __future__ import annotations

import math
import threading
import time

import torch

from mesh.dataplane import Endpoint, GroupCache, digest, membership, nccl_usable
from mesh.dht import data_plane_host
from mesh.tracker import ReportThrottle


def test_endpoint_round_trips_and_refuses_malformed_values() -> None:
    for endpoint in (Endpoint("10.0.0.2", 4242, 77), Endpoint("10.0.0.2", 4242, 77, "GPU-1234")):
        assert Endpoint.from_wire(endpoint.to_wire()) == endpoint
    assert Endpoint.from_wire(["h", 1, 2]) == Endpoint("h", 1, 2, "")  # an older peer's: no GPU offered
    for bad in (None, [], ["h", 1], ["h", 0, 1], ["h", 70000, 1], ["h", True, 1], ["h", 1, False], [1, 2, 3], "h:1:2", ["h", 1, 2, 3]):
        assert Endpoint.from_wire(bad) is None, bad


def test_nccl_only_when_every_member_offers_its_own_gpu() -> None:
    def members(*gpus: str) -> list[Endpoint]:
        return [Endpoint("127.0.0.1", 1000 + i, 0, gpu) for i, gpu in enumerate(gpus)]

    assert nccl_usable(members("GPU-a", "GPU-b", "GPU-c"))
    assert not nccl_usable(members("GPU-a", ""))  # a member on CPU, or one that withholds NCCL after a failure
    assert not nccl_usable(members("GPU-a", "GPU-a"))  # two ranks on one GPU: NCCL refuses them
    assert not nccl_usable(members("GPU-a"))
    # the GPU is part of the group's identity: a member that moved to another device means a new process group
    assert membership([(b"a", Endpoint("h", 1, 0, "GPU-a"))]) != membership([(b"a", Endpoint("h", 1, 0, "GPU-b"))])


def test_a_group_is_reused_only_when_every_member_holds_it() -> None:
    cache = GroupCache("127.0.0.1", timeout=1.0)
    members = [(b"b", Endpoint("127.0.0.1", 2, 0)), (b"a", Endpoint("127.0.0.1", 1, 0))]
    key = membership(members)
    assert key == ((b"a", "127.0.0.1", 1, ""), (b"b", "127.0.0.1", 2, ""))  # sorted by peer id, whatever hivemind's order
    sentinel = object()
    cache._key, cache._group = key, sentinel  # as after a build
    holding = [(peer, Endpoint(e.host, e.port, digest(key))) for peer, e in members]
    assert cache.get(holding, b"a", b"round") == (sentinel, 0)  # everyone holds it: no rendezvous at all
    assert cache.builds == 0
    assert cache.current == digest(key) != 0


def test_data_plane_host_prefers_what_others_can_reach() -> None:
    class FakeDHT:
        def __init__(self, addrs: list[str]) -> None:
            self.addrs = addrs

        def get_visible_maddrs(self, latest: bool = False) -> list[str]:
            return self.addrs

    visible = FakeDHT(["/ip4/127.0.0.1/tcp/1/p2p/X", "/ip4/10.1.2.3/tcp/1/p2p/X"])
    assert data_plane_host("192.168.0.9", "0.0.0.0", (), visible) == "192.168.0.9"  # asked for
    assert data_plane_host(None, "127.0.0.1", (), visible) == "127.0.0.1"  # the listening host
    assert data_plane_host(None, "0.0.0.0", ("/ip4/203.0.113.5/tcp/31337",), visible) == "203.0.113.5"  # announced
    assert data_plane_host(None, "0.0.0.0", ("/dns4/peer.example/tcp/1",), visible) == "10.1.2.3"  # non-loopback first
    assert data_plane_host(None, "0.0.0.0", (), FakeDHT(["/ip4/127.0.0.1/tcp/1/p2p/X"])) == "127.0.0.1"


def test_report_throttle_wakes_at_most_once_per_period() -> None:
    throttle, wakes = ReportThrottle(period=0.2), []
    stop = threading.Event()

    def reporter() -> None:  # hivemind's reporter: wait for "report now" (or its timeout), clear, report
        while not stop.is_set():
            if throttle.wait(5.0):
                throttle.clear()
            wakes.append(time.monotonic())

    thread = threading.Thread(target=reporter, daemon=True)
    thread.start()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # a training loop setting it after every ~1 ms step
        throttle.set()
        time.sleep(0.001)
    stop.set()
    throttle.set()
    thread.join(2)
    gaps = [b - a for a, b in zip(wakes, wakes[1:])]
    assert 3 <= len(wakes) <= 7, wakes  # ~5 in 1 s, not ~1000
    assert min(gaps) >= 0.19, gaps


def test_a_group_is_settled_only_when_complete_in_one_epoch_and_calm() -> None:
    from mesh.averager import ROW, decode_row, settled

    def member(**overrides) -> dict:
        return {"epoch": 7, "live": 2, "resync": False, "leaving": False, **overrides}

    assert settled({"a": member(), "b": member()})
    assert not settled({})
    assert not settled({"a": member(), "b": member(live=3)})  # a third live peer is not in the group
    assert not settled({"a": member(), "b": member(epoch=8)})  # two epochs
    assert not settled({"a": member(), "b": member(resync=True)})  # a member new or drifted
    assert not settled({"a": member(), "b": member(leaving=True)})  # a member leaving
    assert not settled({"a": member(epoch=None), "b": member(epoch=None)})  # no epochs published (another version)
    assert not settled({"a": member(), "b": None})  # malformed metadata
    row = decode_row([16.0, 7.0, 250.5, 16.0, 2.0, 0.0, 1.0, 3.5])
    assert row == {"weight": 16.0, "epoch": 7, "rate": 250.5, "batch": 16, "live": 2, "resync": False, "leaving": True, "params": 3.5}
    assert decode_row([0.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0, math.nan])["epoch"] is None
    assert len(ROW) == 8


def test_members_behind_the_groups_epoch_weigh_nothing() -> None:
    from mesh.averager import current_weights

    assert current_weights([16, 32, 48], [7, 7, 7]) == [16, 32, 48]
    assert current_weights([16, 32, 48], [7, 7, 5]) == [16, 32, 0]  # two epochs behind
    assert current_weights([16, 32, 48], [7, 8, 6]) == [0, 32, 0]  # the group's epoch is the newest
    assert current_weights([16, 32, 48], [7, None, 6]) == [16, 32, 0]  # no epoch published: kept
    # the newest among members with weight: a member leaving (weight 0) sets no epoch for the others
    assert current_weights([16, 0, 48], [7, 9, 7]) == [16, 0, 48]
    assert current_weights([0, 0], [7, 7]) == [0, 0]  # everyone tagged along: nothing to weigh


def test_parameter_digests_tell_equal_parameters_from_unequal_ones() -> None:
    from mesh.averager import parameter_digest, parameters_agree

    torch.manual_seed(0)
    params = [torch.randn(1000, 10), torch.randn(17)]
    same = [p.clone() for p in params]
    assert parameter_digest(params) == parameter_digest(same)
    nudged = [p.clone() for p in params]
    nudged[0][123, 4] = torch.nextafter(nudged[0][123, 4], torch.tensor(float("inf")))  # one value, one ulp
    swapped = [p.clone() for p in params]
    swapped[1][[0, 1]] = swapped[1][[1, 0]]  # the same values in another order: the same sums, caught by none
    assert parameter_digest(nudged) != parameter_digest(params)
    assert parameter_digest(swapped) == parameter_digest(params)  # documented blind spot: order is not hashed
    digest = parameter_digest(params)
    assert parameters_agree({"a": {"params": digest}, "b": {"params": digest}})
    assert not parameters_agree({"a": {"params": digest}, "b": {"params": parameter_digest(nudged)}})
    assert not parameters_agree({"a": {"params": math.nan}, "b": {"params": math.nan}})  # not checked this round
    assert not parameters_agree({"a": {"params": digest}})  # a group of one has nothing to agree with
    assert not parameters_agree({"a": {"params": digest}, "b": None})  # malformed metadata
    assert not parameters_agree({"a": {"params": digest}, "b": {}})  # no digest (hivemind's all-reduce, an older peer)


def test_load_scaled_writes_the_scaled_sources_into_the_views() -> None:
    from mesh.dataplane import flat_views, load_scaled_

    sources = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64)]  # the second takes the copy-then-scale path
    flat, views = flat_views([torch.zeros(5, 3), torch.zeros(7)])
    load_scaled_(views, sources, 0.25)
    torch.testing.assert_close(views[0], sources[0] * 0.25, rtol=0, atol=0)
    torch.testing.assert_close(views[1], (sources[1] * 0.25).float())
    assert flat.data_ptr() == views[0].data_ptr()  # in the shared buffer, not a copy


def test_load_difference_writes_the_scaled_differences_into_the_views() -> None:
    from mesh.dataplane import flat_views, load_difference_

    # a parameter that requires grad (the model's), on the data-plane thread's grad mode: still no autograd error
    outer, current = [torch.randn(4, 2), torch.randn(3)], [torch.randn(4, 2, requires_grad=True), torch.randn(3, dtype=torch.float64)]
    flat, views = flat_views([torch.zeros(4, 2), torch.zeros(3)])
    load_difference_(views, outer, current, 0.5)
    torch.testing.assert_close(views[0], (outer[0] - current[0].detach()) * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(views[1], ((outer[1] - current[1].float()) * 0.5))
    assert flat.data_ptr() == views[0].data_ptr()


def test_the_outer_optimizer_takes_a_hand_computed_nesterov_step() -> None:
    """DiLoCo's outer step (Sutskever et al.'s Nesterov momentum as torch writes it, dampening 0):
    m ← μ·m + g, θ ← θ − lr·(g + μ·m); two steps, against the formula by hand."""
    from mesh.diloco import outer_optimizer_factory

    lr, mu = 0.7, 0.9
    theta = torch.tensor([1.0, -2.0, 0.5])
    param = theta.clone().requires_grad_(False)
    opt = outer_optimizer_factory(lr, mu)([param])
    g1, g2 = torch.tensor([0.1, 0.2, -0.3]), torch.tensor([-0.05, 0.4, 0.1])
    param.grad = g1.clone()
    opt.step()
    m1 = g1  # the first step's momentum is the gradient itself
    expected = theta - lr * (g1 + mu * m1)
    torch.testing.assert_close(param, expected)  # 1 - 0.7·(0.1 + 0.09) = 0.867, ...
    assert abs(float(param[0]) - 0.867) < 1e-6
    param.grad = g2.clone()
    opt.step()
    m2 = mu * m1 + g2
    torch.testing.assert_close(param, expected - lr * (g2 + mu * m2))
    torch.testing.assert_close(opt.state[param]["momentum_buffer"], m2)
    # momentum 0 is plain SGD, and lr 1 then makes the outer step the parameters' average (pseudo-gradient = θ − mean)
    plain = torch.tensor([2.0])
    sgd = outer_optimizer_factory(1.0, 0.0)([plain])
    plain.grad = torch.tensor([2.0 - 1.5])
    sgd.step()
    assert float(plain) == 1.5


def test_tcp_traffic_counts_the_bytes_on_the_wire_of_every_socket() -> None:
    """Against the bytes a real TCP connection on 127.0.0.1 carried, both ways, across two readings and a close."""
    import socket

    from mesh.wirebytes import TcpTraffic

    traffic = TcpTraffic()
    base_sent, base_received = traffic.update()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    with server, client, peer:
        client.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(peer.recv(1 << 16))
        peer.sendall(b"y" * 777)
        assert client.recv(1000) == b"y" * 777
        # both ends are this process's: each byte is counted once sent and once received
        assert traffic.update() == (base_sent + 100_777, base_received + 100_777)
        client.sendall(b"z" * 10)
        assert peer.recv(100) == b"z" * 10
        assert traffic.update() == (base_sent + 100_787, base_received + 100_787)  # only the new bytes
    assert traffic.update() == (base_sent + 100_787, base_received + 100_787)  # closed sockets take nothing away
