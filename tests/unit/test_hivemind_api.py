"""Every hivemind name the mesh relies on still exists with the shape the mesh expects.

The mesh plugs into hivemind through its public seams where they exist (``grad_averager_factory``, the gradient
averager's ``schedule_step``/``step``/``notify_used_averaged_gradients``/``reset_accumulated_grads_``, the
``_aggregate_with_group`` override hivemind's own PowerSGD averager uses) and through a few privates where none
does. A hivemind upgrade that renames or reshapes one of them fails here, with the reason, instead of deep inside
a training run.
"""

from __future__ import annotations

import inspect
import re

import hivemind
import pytest
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException, PotentialLeaders
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

from mesh.planeround import PlaneRound


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(function) -> str:
    return inspect.getsource(function)


def test_hivemind_version_is_the_pinned_one() -> None:
    assert hivemind.__version__ == "1.1.12", "the checks below were written against 1.1.12; re-read them on a bump"


@pytest.mark.parametrize(
    "name",
    ["grad_averager_factory", "tracker_opts", "average_state_every", "delay_state_averaging", "grad_compression", "use_local_updates"],
)
def test_optimizer_takes_the_arguments_the_trainer_passes(name: str) -> None:
    assert name in parameters(hivemind.Optimizer.__init__)


def test_optimizer_builds_its_state_averager_in_the_method_the_mesh_overrides() -> None:
    # MeshOptimizer._make_state_averager copies the body of this method with its class swapped
    body = source(hivemind.Optimizer._make_state_averager)
    for argument in (
        'prefix=f"{self.run_id}_state_averager"',
        "min_matchmaking_time=self.matchmaking_time",
        "allreduce_timeout=self.allreduce_timeout",
        "offload_optimizer=self.offload_optimizer",
        "custom_gradients=self.offload_optimizer",
        "next_chunk_timeout=self.next_chunk_timeout",
        "start=True",
    ):
        assert argument in body, f"hivemind.Optimizer._make_state_averager no longer passes {argument}"


def test_optimizer_reads_average_state_every_each_epoch() -> None:
    # MeshOptimizer.average_state_every is a property read at every epoch's parameter-averaging decision
    body = source(hivemind.Optimizer._update_global_epoch)
    assert "next_epoch % self.average_state_every == 0" in body
    decision, consumed = body.index("self.average_state_every"), body.index("_average_gradients_and_load_into_optimizer")
    assert consumed < decision, "the decision must come after the gradient round's result is used"


def test_gradient_averager_hooks_used_for_round_accounting() -> None:
    assert "averaged_grads" in parameters(GradientAverager.__init__)
    assert parameters(GradientAverager.schedule_step)[:2] == ["self", "scheduled_time"]
    assert "control" in parameters(GradientAverager.step) and "wait" in parameters(GradientAverager.step)
    for name in ("notify_used_averaged_gradients", "reset_accumulated_grads_", "accumulate_grads_"):
        assert callable(getattr(GradientAverager, name))
    body = source(hivemind.Optimizer._load_averaged_gradients_into_optimizer_)
    assert "notify_used_averaged_gradients()" in body  # called once the round's result (or the local one) is used
    assert "self.grad_averager.reset_accumulated_grads_()" in source(hivemind.Optimizer._update_global_epoch)


def test_gradient_step_loads_then_weighs_then_triggers_and_the_fallback_reloads() -> None:
    # MeshGradientAverager.step keeps the accumulators until the epoch ends, defers a standing round's load to the
    # round (after the trigger), and relies on hivemind's fallback reloading the accumulators for the local gradient
    assert "reset_accumulators" in parameters(GradientAverager.step)
    body = source(GradientAverager.step)
    load, weight, trigger = (
        body.index(s) for s in ("self.load_accumulators_into_averager_()", "control.weight =", "control.allow_allreduce()")
    )
    assert load < weight < trigger
    assert "self.local_samples_accumulated" in body  # the weight: read after the load, before the epoch's reset
    assert "self.grad_averager.load_accumulators_into_averager_()" in source(hivemind.Optimizer._load_local_gradients_into_optimizer)
    epoch = source(hivemind.Optimizer._update_global_epoch)  # the epoch's reset comes once the round is used
    assert epoch.index("_average_gradients_and_load_into_optimizer") < epoch.rindex("self.grad_averager.reset_accumulated_grads_()")
    assert callable(GradientAverager._grad_accumulators) and "local_times_accumulated" in source(GradientAverager.accumulate_grads_)


def test_averager_internals_the_data_plane_hooks_into() -> None:
    assert parameters(DecentralizedAverager._aggregate_with_group)[:3] == ["self", "group_info", "min_vector_size"]
    assert parameters(DecentralizedAverager._step) == ["self", "step", "future_for_init"]
    step_body = source(DecentralizedAverager._step)
    assert "self._matchmaking.look_for_group(step)" in step_body
    assert "weight=step.weight" in step_body and "self._aggregate_with_group(" in step_body
    assert "self._running_groups" in source(DecentralizedAverager._register_allreduce_group)
    assert "self.lock_averaged_tensors" in source(DecentralizedAverager.get_tensors)
    assert "data_for_gather = self.serializer.dumps([self.bandwidth, self.mode.value, user_data_for_gather])" in (
        source(DecentralizedAverager.step)
    )
    assert issubclass(MatchmakingException, Exception)


def test_matchmaking_closes_a_group_at_target_group_size() -> None:
    for cls in (Matchmaking, PotentialLeaders, GroupKeyManager):
        assert "target_group_size" in parameters(cls.__init__)
    assert "len(self.current_followers) + 1 >= self.target_group_size" in source(Matchmaking.rpc_join_group)
    assert "self.target_group_size" in source(GroupKeyManager.update_key_on_group_assembled)


def test_optimizer_builds_its_progress_tracker_in_the_method_the_mesh_overrides() -> None:
    # MeshOptimizer._make_progress_tracker copies the body of this method with its class swapped
    body = source(hivemind.Optimizer._make_progress_tracker)
    for argument in ("prefix=self.run_id", "target_batch_size=target_batch_size", "client_mode=self.client_mode", "start=True"):
        assert argument in body, f"hivemind.Optimizer._make_progress_tracker no longer passes {argument}"
    assert "self._make_progress_tracker(" in source(hivemind.Optimizer.__init__)


def test_the_epoch_ends_where_the_planned_tracker_says() -> None:
    # MeshProgressTracker overrides these two properties; hivemind must still decide the epoch and matchmaking by them
    assert isinstance(ProgressTracker.ready_to_update_epoch, property)
    assert isinstance(ProgressTracker.estimated_next_update_time, property)
    assert "if self.tracker.ready_to_update_epoch:" in source(hivemind.Optimizer.step)
    assert "self.tracker.estimated_next_update_time" in source(hivemind.Optimizer._maybe_schedule_gradient_averaging)
    assert "self.local_progress.samples_accumulated" in source(ProgressTracker.report_local_progress)
    assert "samples_per_second" in source(ProgressTracker._get_local_progress)  # the pace the plan publishes


def test_progress_tracker_names_the_trainer_uses() -> None:
    assert "metadata_expiration" in parameters(ProgressTracker.__init__)
    init = source(ProgressTracker.__init__)
    # MeshProgressTracker swaps the event before the thread starts, so it needs both to be made in __init__
    assert "self.should_report_progress" in init and "if start:" in init and "start" in parameters(ProgressTracker.__init__)
    reporter = source(ProgressTracker._progress_reporter)
    assert "self.should_report_progress.wait" in reporter  # ReportThrottle stands in for this event
    assert "self.should_report_progress.set()" in source(ProgressTracker.report_local_progress)
    fetcher = source(ProgressTracker._progress_fetcher)
    assert "self.global_progress.next_fetch_time" in fetcher and "self.global_state_updated.wait" in fetcher


def test_what_the_run_end_reads_and_starts() -> None:
    """MeshOptimizer.finish: the others' epochs from the progress records, a withdrawn record on a graceful leave,
    and a parameter round of its own through the state averager's pre-scheduled control."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress

    assert {"peer_id", "epoch"} <= set(LocalTrainingProgress.__fields__)
    assert "self.training_progress_key" in source(ProgressTracker.__init__)
    assert "value=None" in source(ProgressTracker.shutdown)  # others stop counting a peer that left
    assert "scheduled_time" in parameters(TrainingStateAverager.schedule_step)
    assert {"averaging_round", "averaging_control", "averaging_opts"} <= set(parameters(TrainingStateAverager.step))
    # LastRoundMixin sits below TrainingStateAverager: its rounds go through the averaging-level step
    assert "super().step(" in source(TrainingStateAverager.schedule_step) and "super().step(" in source(TrainingStateAverager._do)
    # finish schedules each attempt's start inside it: hivemind asserts the start falls before the deadline, and its
    # default start is now + the matchmaking time, which finish reads from here
    assert "assert scheduled_time < deadline" in source(DecentralizedAverager.step)
    assert "min_matchmaking_time=min_matchmaking_time" in source(DecentralizedAverager.__init__)


def test_step_control_stages_the_round_watcher_reads() -> None:
    assert {"AWAITING_TRIGGER", "RUNNING_ALLREDUCE", "FINISHED"} <= set(AveragingStage.__members__)
    for name in ("stage", "triggered", "weight", "done", "result", "cancelled", "exception"):
        assert hasattr(StepControl, name)


def test_the_round_handle_offers_what_hivemind_calls_on_a_gradient_round() -> None:
    # hivemind.Optimizer and GradientAverager.step drive a round through these names; PlaneRound stands in for
    # StepControl on the data plane, so each name they use must exist on it
    uses = {
        "triggered": [GradientAverager.step, hivemind.Optimizer._tag_along_with_zero_weight, hivemind.Optimizer._begin_averaging_gradients],
        "allow_allreduce()": [GradientAverager.step, hivemind.Optimizer._tag_along_with_zero_weight],
        "weight =": [GradientAverager.step, hivemind.Optimizer._tag_along_with_zero_weight],
        "result(": [GradientAverager.step, hivemind.Optimizer._average_gradients_and_load_into_optimizer],
        "done()": [hivemind.Optimizer._begin_averaging_gradients, hivemind.Optimizer.load_state_from_peers],
        "cancel()": [hivemind.Optimizer._begin_averaging_gradients],
        "stage": [hivemind.Optimizer.shutdown],
    }
    for name, functions in uses.items():
        for function in functions:
            assert name in source(function), f"{function.__qualname__} no longer uses {name!r} on its round"
        assert hasattr(PlaneRound, name.rstrip("(). =")), name
    for function in (GradientAverager.step, hivemind.Optimizer._begin_averaging_gradients):
        for used in ("control.", "self.scheduled_grads."):
            for attribute in re.findall(re.escape(used) + r"(\w+)", source(function)):
                assert hasattr(PlaneRound, attribute), f"{function.__qualname__} uses .{attribute} on its round"
    assert "step.set_result(" in source(DecentralizedAverager._step)  # what _aggregate_with_group returns: the Match


def test_state_sharing_priority_is_a_property_the_optimizer_sets_every_epoch() -> None:
    # DeclareThrottleMixin overrides it and calls hivemind's getter and setter
    prop = DecentralizedAverager.state_sharing_priority
    assert isinstance(prop, property) and prop.fset is not None
    assert "self.state_averager.state_sharing_priority = self.local_epoch" in source(hivemind.Optimizer._update_global_epoch)
    assert "_trigger_declare_load_state" in source(prop.fset)


def test_training_state_averager_is_a_decentralized_averager() -> None:
    assert issubclass(TrainingStateAverager, DecentralizedAverager)  # so GroupSizeMixin's _step applies to it


def test_the_offloaded_optimizer_diloco_and_the_resume_rely_on() -> None:
    # with gradient averaging hivemind offloads the optimizer: it steps its own copy of the parameters (the resume
    # sets that copy; DiLoCo uses it as the outer parameters) and the averaged gradients are that copy's .grad
    assert "offload_optimizer = params is not None and not use_local_updates" in source(hivemind.Optimizer.__init__)
    assert "force_copy=self.offload_optimizer" in source(TrainingStateAverager._make_averaged_parameters)
    assert "opt_param.grad = averaged_grad" in source(hivemind.Optimizer._make_gradient_averager)
    assert "self._apply_optimizer_parameters_()" in source(TrainingStateAverager.load_state_from_peers)
    assert "average_opt_statistics" in parameters(hivemind.Optimizer.__init__)
    # the averaged statistics are the optimizer's state tensors themselves, after the parameters, key by key
    # (MeshOptimizer.share_averaged_statistics re-points the optimizer at them after a load_state_dict)
    local = source(TrainingStateAverager._local_tensors)
    assert local.index('yield from param_group["params"]') < local.index("for stats in self.opt_keys_for_averaging")
    assert "yield self.optimizer.state[param][stats]" in local
    assert "return source_tensor" in source(TrainingStateAverager._make_host_tensor)  # reused, not copied
    assert "load_optimizer_state(self.optimizer" in source(TrainingStateAverager.load_state_from_peers)


def test_the_seams_run_admission_hooks_into() -> None:
    """mesh/admitted.py: AdmittedAverager sits below hivemind's averager classes, SignedState above them."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.p2p import ServicerBase

    from mesh.admitted import handle_name

    # the public-name refusals register handlers under hivemind's own names for them
    assert ServicerBase._get_handle_name("ns", "rpc_join_group") == handle_name("ns", "ServicerBase", "rpc_join_group")
    # a ticket travels in the gathered metadata, which hivemind packs as [bandwidth, mode, user bytes]
    assert "gather" == parameters(DecentralizedAverager.step)[1]
    assert "[self.bandwidth, self.mode.value, user_data_for_gather]" in source(DecentralizedAverager.step)
    # both averagers reach DecentralizedAverager.step through super(), so the admission's step sees every round
    assert "super().step(" in source(GradientAverager.schedule_step)
    assert "averaging_control = super().step(" in inspect.getsource(TrainingStateAverager)
    # the state hivemind serves is built by TrainingStateAverager without super(): the MAC is added above it
    assert "super().get_current_state" not in source(TrainingStateAverager.get_current_state)
    # ... and read back below it: TrainingStateAverager loads what DecentralizedAverager's download returns
    assert "super().load_state_from_peers(**kwargs)" in source(TrainingStateAverager.load_state_from_peers)
    # the RPCs admission guards, and the p2p registration it extends with the public-name handlers
    for rpc in ("rpc_join_group", "rpc_download_state", "rpc_aggregate_part"):
        shapes = (["request", "context"], ["_request", "_context"], ["stream", "context"])
        assert parameters(getattr(DecentralizedAverager, rpc))[1:] in shapes
    assert "await self.add_p2p_handlers(self._p2p, namespace=self.prefix)" in source(DecentralizedAverager._run_internal)
    # owned DHT subkeys: the marker the records' subkeys carry
    assert RSASignatureValidator.PUBLIC_KEY_FORMAT == b"[owner:_key_]"


def test_the_scheduler_catch_up_the_optimizer_repeats_where_hivemind_sets_the_epoch() -> None:
    # MeshOptimizer.sync_scheduler calls this after hivemind sets the epoch without it (a checkpoint, a catch-up)
    assert "while self.scheduler._step_count <= self.local_epoch" in source(TrainingStateAverager._update_scheduler)
    assert "self.state_averager.local_epoch = self.tracker.global_epoch" in source(hivemind.Optimizer.load_state_from_peers)
    assert "self.state_averager.local_epoch = state_dict" in source(hivemind.Optimizer.load_state_dict)


def test_what_the_catch_up_to_the_swarms_epoch_relies_on() -> None:
    # MeshOptimizer._load_the_swarms_epoch: hivemind relabels a state one epoch behind with the swarm's epoch; the
    # state averager applies a downloaded state only if it is not behind the local epoch (else warns, on this logger)
    # and takes the epoch from the state's metadata, which DecentralizedAverager.load_state_from_peers returns
    import hivemind.optim.state_averager as state_averager_module

    from mesh.optimizer import STATE_AVERAGER_LOGGER

    relabel = source(hivemind.Optimizer.load_state_from_peers)
    assert "if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:" in relabel
    load = source(TrainingStateAverager.load_state_from_peers)
    assert 'metadata["epoch"] < self.local_epoch' in load and "Cowardly refusing" in load
    assert 'self.local_epoch = metadata["epoch"]' in load
    assert "metadata, flat_tensors = loaded_state" in load
    assert state_averager_module.logger.name == STATE_AVERAGER_LOGGER
    assert parameters(DecentralizedAverager.load_state_from_peers) == ["self", "wait", "timeout"]


def test_what_keeps_a_state_that_is_not_finite_out_of_rounds_and_downloads() -> None:
    """mesh.averager.FiniteStateMixin: the all-reduce of a parameter round runs on the tensors it is given, with the
    weight it is given (a scratch copy at weight 0); a donor that answers a download with nothing is passed over."""
    assert parameters(DecentralizedAverager._run_allreduce_inplace_)[:4] == ["self", "tensors", "group_info", "group_id"]
    run = source(DecentralizedAverager._run_allreduce_inplace_)
    assert "tensors=tensors" in run and "**kwargs" in run and "tensor.add_(update" in run
    # a part whose reducer failed comes back unchanged (a zero delta), counted in the runner's container
    assert "self._running_groups[group_id].set_result(runner)" in run
    assert "self.tensor_part_container = TensorPartContainer(" in source(hivemind.averaging.allreduce.AllReduceRunner.__init__)
    failed = source(hivemind.averaging.partition.TensorPartContainer.register_failed_reducer)
    assert "torch.zeros_like" in failed and "self.failed_size +=" in failed
    # the download check asks the training process for the state it would serve, as hivemind's handler does
    assert "await self._get_current_state_from_host_process()" in source(DecentralizedAverager.rpc_download_state)
    assert "self._run_allreduce_inplace_(local_tensors, group_info" in source(DecentralizedAverager._aggregate_with_group)
    assert "weight" in parameters(hivemind.averaging.allreduce.AllReduceRunner.__init__)
    loading = source(DecentralizedAverager._load_state_from_peers)
    assert "did not send its state" in loading and "continue" in loading
    assert inspect.isasyncgenfunction(DecentralizedAverager.rpc_download_state)


def test_what_makes_a_parameter_round_exact_on_float64_copies() -> None:
    """mesh.averager.ExactRoundMixin: the reducer sums into a float32 buffer and sends each member the mean minus
    its part, which the member adds to its own tensor; parts are cut by bytes (part_size_bytes, from the
    runner's kwargs) over the tensors' element size."""
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

    assert "self.accumulator = torch.zeros(self.part_shapes[self.current_part_index])" in source(TensorPartReducer.reset_accumulators)
    assert source(AllReduceRunner).count("averaged_part - tensor_part") == 2  # its own part, and each sender's
    assert "TensorPartContainer(tensors, peer_fractions, return_deltas=True, **kwargs)" in source(AllReduceRunner.__init__)
    assert "part_size_bytes" in parameters(TensorPartContainer.__init__)
    assert "tensor.element_size()" in source(TensorPartContainer.__init__)
    assert "tensor.add_(update, alpha=self._averaging_alpha)" in source(DecentralizedAverager._run_allreduce_inplace_)
