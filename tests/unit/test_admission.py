"""Run admission's rules (mesh/admission.py) and the record choice they drive (mesh/records.py), against values
worked out by hand: which copy a peer trains by, what a ticket admits, what a signature covers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hivemind.dht.crypto import DHTRecord, RSASignatureValidator
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from mesh.admission import REFUSAL_REASONS, REMEMBERED, Admission
from mesh.admitted import state_mac
from mesh.config import ConfigError, PeerConfig, UpConfig, describe
from mesh.errors import RunError
from mesh.records import OWNER_MARK, PeerPresence, RunRecord, choose_record, listed_record, make_record, owned, owner_free, parse_peers
from tests.unit.test_records import HYPER, _Item

SECRET = "a-secret-of-at-least-16"
PEER = b"\x00\x24peer-a"
OTHER = b"\x00\x24peer-b"


def test_a_protected_run_has_its_own_namespace_and_an_open_run_keeps_its_id() -> None:
    open_run, protected = Admission("lm.1"), Admission("lm.1", SECRET)
    assert open_run.namespace == "lm+1"  # hivemind forbids "." in its names; run ids cannot have "+"
    assert protected.namespace.startswith("lm+1_") and len(protected.namespace) == len("lm+1_") + 32
    assert "." not in protected.namespace
    assert protected.namespace != Admission("lm.1", SECRET + "x").namespace  # another secret
    assert protected.namespace.split("_")[1] != Admission("lm.2", SECRET).namespace.split("_")[1]  # another run
    assert protected.public_name(protected.namespace + "_grad_averager") == "lm+1_grad_averager"


def test_a_ticket_admits_only_the_peer_it_was_made_for() -> None:
    admission = Admission("run", SECRET)
    ticket = admission.ticket(PEER)
    assert admission.admits(PEER, ticket)
    assert not admission.admits(OTHER, ticket)  # replayed under another peer id
    assert not admission.admits(PEER, Admission("run", "another-secret-16ch").ticket(PEER))
    assert not admission.admits(PEER, None) and not admission.admits(PEER, 42)
    assert Admission("run").admits(PEER, None)  # an open run admits everyone


def test_a_signature_covers_the_whole_payload() -> None:
    admission = Admission("run", SECRET)
    payload = {"lr": 0.2, "task": "demo"}
    signature = admission.sign("record", payload)
    assert admission.verify("record", dict(reversed(payload.items())), signature)  # key order does not matter
    assert not admission.verify("record", {**payload, "lr": 1e6}, signature)
    assert not admission.verify("presence", payload, signature)  # a record's signature is not a presence's
    assert not admission.verify("record", payload, None)


def test_refusals_are_counted_by_reason_and_a_record_read_again_once() -> None:
    admission = Admission("run", SECRET)
    admission.refuse("ticket", "peer-a")
    admission.refuse("ticket", "peer-a")
    admission.refuse("record", "run", once="run[owner:x]")
    admission.refuse("record", "run", once="run[owner:x]")
    assert admission.refusals() == {**dict.fromkeys(REFUSAL_REASONS, 0), "ticket": 2, "record": 1}
    # an attacker cycling peer ids and subkeys grows the limiter's memory only to a bound
    for index in range(2 * REMEMBERED):
        admission.refuse("presence", f"peer-{index}", once=f"peer-{index}[owner:k]")
    assert len(admission._logged) <= REMEMBERED and len(admission._seen) <= REMEMBERED
    assert admission.refusals()["presence"] == 2 * REMEMBERED


def _copy(admission: Admission | None, created_at: float = 1.0, owner: str = "[owner:k1]", **overrides) -> tuple[str, RunRecord]:
    record = make_record("run", "regression", "0123456789abcdef", created_at=created_at, **{**HYPER, **overrides})
    if admission is None:
        return "run", record
    content = record.dict(exclude={"signature"})
    return "run" + owner, RunRecord(**content, signature=admission.sign("record", content))


def test_a_protected_peer_takes_the_creators_signed_copy_and_counts_the_forged_ones() -> None:
    admission = Admission("run", SECRET)
    genuine_late, genuine = _copy(admission, created_at=5.0, owner="[owner:k2]"), _copy(admission, created_at=1.0)
    forged = _copy(Admission("run", "the-attackers-secret"), created_at=0.5, owner="[owner:k3]", lr=1e6)
    unsigned = _copy(None, created_at=0.1, lr=1e6)
    chosen = choose_record("run", [forged, genuine_late, unsigned, genuine], admission)
    assert chosen == genuine[1]  # the earliest genuine copy, not the earlier forged or unsigned ones
    assert admission.refusals()["record"] == 2


def test_record_choice_refuses_a_wrong_secret_a_missing_one_and_an_open_run_of_the_same_id() -> None:
    signed = [_copy(Admission("run", SECRET))]
    with pytest.raises(RunError, match="is not its secret"):
        choose_record("run", signed, Admission("run", "another-secret-16ch"))
    with pytest.raises(RunError, match="is protected: pass its secret"):
        choose_record("run", signed, Admission("run"))
    with pytest.raises(RunError, match="is an open run"):
        choose_record("run", [_copy(None)], Admission("run", SECRET))
    # an outsider's unsigned copy beside the signed ones does not make the run look open to a peer without the secret
    with pytest.raises(RunError, match="is protected: pass its secret"):
        choose_record("run", [_copy(None), *signed], Admission("run"))
    assert choose_record("run", [_copy(None)], Admission("run")) == _copy(None)[1]
    # no copy at all is no run
    assert choose_record("run", [], Admission("run", SECRET)) is None


def test_a_forged_presence_is_dropped_under_a_protected_run() -> None:
    admission = Admission("run", SECRET)
    good = PeerPresence(run_id="run", epoch=3, samples_per_second=1.0, time=1.0)
    content = good.dict(exclude={"signature"})
    raw = _Item(
        {
            "peer-a[owner:k1]": _Item({**content, "signature": admission.sign("presence", {"peer": "peer-a", **content})}),
            # peer-a's valid signature copied under another peer id: the signature names the peer
            "peer-b[owner:k2]": _Item({**content, "signature": admission.sign("presence", {"peer": "peer-a", **content})}),
            "peer-c": _Item(content),
            "peer-d": _Item({**content, "run_id": "another-run"}),
        }
    )
    assert list(parse_peers(raw, "run", admission)) == ["peer-a"]
    assert admission.refusals()["presence"] == 2
    assert sorted(parse_peers(raw, None, Admission("run"))) == ["peer-a", "peer-b", "peer-c", "peer-d"]  # a lister


def test_a_coordinator_with_the_run_secret_key_lists_the_genuine_copy_and_only_signed_presences() -> None:
    """``mesh api --run-secret-key``: the runs whose secret it hands out are verified before they are listed."""
    from api.observer import _admission
    from mesh.admission import coordinator_secret

    key = "the-coordinators-key-16"
    admission = _admission(key, "run")
    assert admission is _admission(key, "run")  # one per run: its refusal log limits hold across scans
    assert admission.verify("x", {}, Admission("run", coordinator_secret(key, "run")).sign("x", {}))
    genuine = _copy(admission, created_at=2.0)
    forged = _copy(Admission("run", "the-attackers-secret"), created_at=1.0, owner="[owner:k3]", lr=1e6)
    unsigned = _copy(None, created_at=0.5, lr=1e6)
    assert listed_record([forged, unsigned, genuine], admission) == (genuine[1], True)
    # without the key (or for a run protected with a secret of its own) nothing can be told apart
    assert listed_record([forged, unsigned, genuine]) == (unsigned[1], False)
    assert listed_record([forged, genuine], Admission("run", "a-secret-of-its-own-16")) == (forged[1], False)
    good = PeerPresence(run_id="run", epoch=3, samples_per_second=1.0, time=1.0)
    content = good.dict(exclude={"signature"})
    raw = _Item(
        {
            "peer-a[owner:k1]": _Item({**content, "signature": admission.sign("presence", {"peer": "peer-a", **content})}),
            "peer-b": _Item(content),  # unsigned, under the verified run
            "peer-c": _Item({**content, "run_id": "open-run"}),  # another run, not verified: taken as it is
        }
    )
    assert sorted(parse_peers(raw, verify_with={"run": admission}.get)) == ["peer-a", "peer-c"]


def test_owned_subkeys_name_this_process_key_and_storing_nodes_refuse_anyone_else_writing_them() -> None:
    subkey = owned("run")
    assert owner_free(subkey) == "run" and OWNER_MARK in subkey
    validator, attacker = RSASignatureValidator(), RSASignatureValidator(RSAPrivateKey())
    record = DHTRecord(b"key", MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps({"lr": 0.2}), get_dht_time() + 60)
    assert validator.validate(dataclasses.replace(record, value=validator.sign_value(record)))
    forged = dataclasses.replace(record, value=MSGPackSerializer.dumps({"lr": 1e6}))
    assert not validator.validate(forged)  # unsigned
    assert not validator.validate(dataclasses.replace(forged, value=attacker.sign_value(forged) + b"[signature:AAAA]"))


def test_a_state_mac_covers_every_tensor_and_the_metadata() -> None:
    admission = Admission("run", SECRET)
    tensors = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor(1.5, dtype=torch.bfloat16)]
    mac = state_mac(admission, {"epoch": 3}, tensors)
    assert mac == state_mac(admission, {"epoch": 3}, [t.clone() for t in tensors])
    assert mac != state_mac(admission, {"epoch": 4}, tensors)
    assert mac != state_mac(admission, {"epoch": 3}, [tensors[0] + 1e-6, tensors[1]])
    assert mac != state_mac(admission, {"epoch": 3}, [tensors[0].reshape(3, 2), tensors[1]])


def test_the_secret_is_checked_and_never_printed() -> None:
    with pytest.raises(ConfigError, match="at least 16 characters"):
        PeerConfig(run="r", run_secret="short")
    with pytest.raises(ConfigError, match="contradict"):
        UpConfig(run_secret=SECRET, open_run=True)
    assert SECRET not in describe(PeerConfig(run="r", run_secret=SECRET))


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "protected"])
def test_what_a_peer_writes_passes_the_validators_every_mesh_node_runs(secret: str | None) -> None:
    # hivemind's schema validator refuses a value that parses only by filling in a default (an open record
    # without its "signature": None was refused by every node, and peers of an open run never saw each other)
    from hivemind.dht.routing import DHTID

    from mesh.records import PEERS_KEY, RUN_RECORD_VALIDATOR, RUNS_KEY, presence_entry, record_entry
    from mesh.runs import starting_presence

    admission = Admission("run", secret)
    entries = [
        (RUNS_KEY, *record_entry(_copy(None)[1], admission)),
        (PEERS_KEY, *presence_entry("peer-a", starting_presence("run", "cpu"), admission)),
    ]
    validator = RSASignatureValidator()
    for key, subkey, value in entries:
        record = DHTRecord(
            DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + 60
        )
        signed = dataclasses.replace(record, value=validator.sign_value(record))
        assert validator.validate(signed) and RUN_RECORD_VALIDATOR.validate(record), (key, subkey, value)
        assert (OWNER_MARK in subkey) == (secret is not None)
