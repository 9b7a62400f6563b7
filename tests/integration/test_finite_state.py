"""A peer whose state (parameters, optimizer statistics) is not finite keeps it out of parameter rounds and downloads
(``FiniteStateMixin`` in mesh/averager.py): in a round it takes the others' mean and adds nothing; a joiner asking
it for the state is sent on to the next donor. And members of a round end it bit-identical (``ExactRoundMixin``).

Real optimizers (the run's, ``make_run_optimizer``) on hivemind DHT nodes on 127.0.0.1, in a fresh Python (hivemind's
objects in the test's process would leave sockets for pytest to report at exit). References: the closed-form mean of
the members' parameters, and the finite donor's parameters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.procs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCRIPT = """
import json, sys, threading, time, warnings
warnings.simplefilter("ignore")
from hivemind.averaging import DecentralizedAverager
from tests.integration.optimizer_peers import parameter_values, set_parameters, sgd_record, start_peer

record = sgd_record("fs", averaging=sys.argv[1], matchmaking_time=1.0, averaging_timeout=20.0)

def parameter_round(*opts):
    for opt in opts:
        opt.state_averager.set_target_group_size(len(opts))
    threads = [threading.Thread(target=opt.state_averager.step, kwargs={"averaging_round": True,
               "averaging_opts": {"timeout": 30}}) for opt in opts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {name: parameter_values(opt) for name, opt in zip("ab", opts)}

a_dht, a = start_peer(record, [])
b_dht, b = start_peer(record, a_dht.get_visible_maddrs())
out = {"averaging": sys.argv[1]}

# 1. both finite: the mean
set_parameters(a, 1.0); set_parameters(b, 3.0)
out["finite"] = parameter_round(a, b)
# 1b. values near zero with opposite signs: in float32, own + (mean - own) is not the mean for both
set_parameters(a, 1e-8); set_parameters(b, -2e-8)
out["near_zero"] = parameter_round(a, b)
# 2. b's parameters are NaN: a keeps its own (the mean of the finite ones), b takes it
set_parameters(a, 5.0); set_parameters(b, float("nan"))
out["b_nan"] = parameter_round(a, b)
out["b_nan_withheld"] = [a.state_averager.nonfinite_state_withheld, b.state_averager.nonfinite_state_withheld]
# 3. both NaN: nothing to take, each keeps its own; no zeros or anything else made up (and no retries to the timeout)
started = time.monotonic()
set_parameters(a, float("nan")); set_parameters(b, float("nan"))
out["both_nan"] = parameter_round(a, b)
out["both_nan_seconds"] = time.monotonic() - started

# 4. a joiner downloads: b (NaN) is the first donor by priority, a (finite, 7.0) the second. b's parameters turn NaN
# after a round in which they were finite: with --averaging local, hivemind's copies that the round averaged still
# hold 7.0, while b would serve its NaN parameters
set_parameters(a, 7.0); set_parameters(b, 7.0)
parameter_round(a, b)
set_parameters(b, float("nan"))
withheld = b.state_averager.nonfinite_state_withheld
for opt, priority in ((a, 1.0), (b, 9.0)):  # past the mesh's throttle (DeclareThrottleMixin): declared at once
    DecentralizedAverager.state_sharing_priority.fset(opt.state_averager, priority)
time.sleep(2.0)  # the declarations reach the DHT
c_dht, c = start_peer(record, a_dht.get_visible_maddrs())
c.state_averager.load_state_from_peers(timeout=30)  # applies what it downloaded (hivemind returns nothing)
out["download"] = parameter_values(c)
out["download_withheld"] = b.state_averager.nonfinite_state_withheld - withheld
print(json.dumps(out))
for opt, dht in ((c, c_dht), (b, b_dht), (a, a_dht)):
    opt.shutdown()
    dht.shutdown()
"""


@pytest.fixture(scope="module", params=["gradients", "local"])
def outcome(request: pytest.FixtureRequest) -> dict:
    """Both ways hivemind keeps a state: the optimizer's own tensors averaged in place (gradient averaging: an
    offloaded optimizer), or copies loaded before each round (--averaging local)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, request.param], cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_parameter_round_of_finite_members_is_their_mean(outcome: dict) -> None:
    assert outcome["finite"] == {"a": [2.0] * 4, "b": [2.0] * 4}, outcome


def test_members_of_a_parameter_round_end_it_bit_identical_on_the_float32_mean(outcome: dict) -> None:
    """ExactRoundMixin: hivemind hands each member the mean as a difference from its own values; in float32 that
    left a and b an ulp apart here. With --averaging local the round stays float32 (it is the averaging, every
    epoch): within float32 rounding of the mean."""
    mean = float((torch.tensor(1e-8) + torch.tensor(-2e-8)) / 2)  # hivemind's reducer: a float32 sum, then / 2
    if outcome["averaging"] == "local":
        for values in outcome["near_zero"].values():
            assert values == pytest.approx([mean] * 4, rel=1e-6), outcome
    else:
        assert outcome["near_zero"] == {"a": [mean] * 4, "b": [mean] * 4}, outcome


def test_a_member_with_nan_parameters_takes_the_others_mean_and_adds_nothing_to_it(outcome: dict) -> None:
    # without FiniteStateMixin both ended NaN: the NaN went into the mean, and so into a's parameters too
    assert outcome["b_nan"] == {"a": [5.0] * 4, "b": [5.0] * 4}, outcome
    assert outcome["b_nan_withheld"] == [0, 1], outcome


def test_a_round_with_no_finite_member_fails_and_makes_nothing_up(outcome: dict) -> None:
    # every member's contribution weighs 0: the mean is 0/0, and no member takes zeros for parameters
    assert all(math.isnan(v) for values in outcome["both_nan"].values() for v in values), outcome
    # nor is it retried until the round's timeout (30 s): raising there would have hivemind form the group again
    assert outcome["both_nan_seconds"] < 20, outcome


def test_a_joiner_is_not_served_a_state_that_is_not_finite(outcome: dict) -> None:
    # b ranks first by priority; without the check the joiner took its NaN parameters
    assert outcome["download"] == [7.0] * 4, outcome
    assert outcome["download_withheld"] >= 1, outcome  # b was asked and answered nothing
