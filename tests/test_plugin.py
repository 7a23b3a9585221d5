"""Entry point, version gate and the named patches (applied once, reversible)."""

import importlib.metadata as md
from types import SimpleNamespace

import pytest

from vllm_clasp import patches, plugin
from vllm_clasp.config import PROPOSER_PATH


def test_entry_point_registered():
    eps = md.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "clasp" and ep.value == "vllm_clasp.plugin:register" for ep in eps)


def test_version_gate():
    assert plugin.version_supported("0.32.0")
    assert plugin.version_supported("0.32.0+cpu")
    assert not plugin.version_supported("0.31.1")
    assert not plugin.version_supported("0.33.0")


def test_patches_apply_idempotently_and_revert():
    plugin.register()
    for p in patches.ALL_PATCHES:
        assert p.applied(), p.__name__
        owner, attr = p.target()
        before = owner.__dict__[attr]
        p.apply()
        assert owner.__dict__[attr] is before, f"{p.__name__} applied twice"
    p = patches.ClaspLookaheadSlots
    p.revert()
    assert not p.applied()
    p.apply()
    assert p.applied()


def test_lookahead_only_for_clasp():
    from vllm.config import VllmConfig

    plugin.register()
    prop = VllmConfig.__dict__["num_lookahead_tokens"]
    clasp = SimpleNamespace(speculative_config=SimpleNamespace(method="custom_class", model=PROPOSER_PATH, num_speculative_tokens=5))
    assert prop.fget(clasp) == 5
    other = SimpleNamespace(speculative_config=None)
    assert prop.fget(other) == 0


def test_is_clasp():
    assert patches.is_clasp(SimpleNamespace(method="custom_class", model=PROPOSER_PATH))
    assert not patches.is_clasp(SimpleNamespace(method="custom_class", model="x.Y"))
    assert not patches.is_clasp(SimpleNamespace(method="ngram", model=None))
    assert not patches.is_clasp(None)


def test_unsupported_vllm_refuses_clasp_clearly(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    try:
        plugin._refuse_clasp("9.9.9")
        args = SimpleNamespace(speculative_config={"method": "clasp"})
        with pytest.raises(ValueError, match="needs vLLM 0.32.0; this is vLLM 9.9.9"):
            EngineArgs.create_speculative_config(args, None, None)
    finally:
        EngineArgs.create_speculative_config = original


def test_a_clasp_step_without_drafts_is_prepared_as_a_plain_step():
    from types import SimpleNamespace

    from vllm_clasp.patches import PlainSamplingWithoutDrafts
    from vllm_clasp.proposer import ClaspProposer

    seen = []

    def original(self, scheduler_output, *args):
        seen.append(self.speculative_config)
        return "prepared"

    prepare = PlainSamplingWithoutDrafts.build(original)
    runner = SimpleNamespace(
        speculative_config="spec",
        drafter=object.__new__(ClaspProposer),
        input_batch=SimpleNamespace(generators={}),
        model_config=SimpleNamespace(is_hybrid=False),
    )
    assert prepare(runner, SimpleNamespace(scheduled_spec_decode_tokens={})) == "prepared"
    prepare(runner, SimpleNamespace(scheduled_spec_decode_tokens={"r": [5]}))  # drafts: spec step
    runner.input_batch.generators = {0: object()}  # a seeded request: its sampler stays the same
    prepare(runner, SimpleNamespace(scheduled_spec_decode_tokens={}))
    runner.input_batch.generators, runner.drafter = {}, object()  # not clasp (ngram, eagle): untouched
    prepare(runner, SimpleNamespace(scheduled_spec_decode_tokens={}))
    assert seen == [None, "spec", "spec", "spec"] and runner.speculative_config == "spec"


def test_hidden_states_are_captured_only_in_steps_that_may_plan():
    from vllm_clasp.patches import CaptureHiddenStatesOnlyForPlans
    from vllm_clasp.proposer import ClaspProposer

    switched = []
    drafter = object.__new__(ClaspProposer)
    drafter.needs_hidden_states = lambda runner, so: so.want
    drafter.stack = SimpleNamespace(capture_all_layers=switched.append)
    runner = SimpleNamespace(drafter=drafter, use_aux_hidden_state_outputs=True,
                             model_config=SimpleNamespace(enforce_eager=True))
    update = CaptureHiddenStatesOnlyForPlans.build(lambda self, so: "updated")
    assert update(runner, SimpleNamespace(want=False)) == "updated"
    assert switched == [False] and not runner.use_aux_hidden_state_outputs
    update(runner, SimpleNamespace(want=False))  # no change: nothing switched again
    update(runner, SimpleNamespace(want=True))
    assert switched == [False, True] and runner.use_aux_hidden_state_outputs
    runner.model_config.enforce_eager = False  # a compiled forward keeps what it was built with
    update(runner, SimpleNamespace(want=False))
    assert switched == [False, True] and runner.use_aux_hidden_state_outputs


def test_a_step_needs_hidden_states_when_a_sampled_row_is_due_a_plan_that_may_happen():
    import numpy as np

    from vllm_clasp.config import ClaspConfig
    from vllm_clasp.governor import Governor
    from vllm_clasp.proposer import ClaspProposer, _SeqState

    p = object.__new__(ClaspProposer)
    p.cfg, p.num_skip, p.governor = ClaspConfig(), 12, Governor()
    planned = _SeqState(keep=np.ones(30, dtype=bool))
    p.seqs = {"a": planned}
    batch = SimpleNamespace(req_ids=["a", "b"], generators={}, num_computed_tokens_cpu=np.array([40, 0]),
                            num_prompt_tokens=np.array([20, 100]))
    runner = SimpleNamespace(input_batch=batch)
    step = SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 50})
    assert not p.needs_hidden_states(runner, step)  # "a" has a fresh plan; "b" is mid-prefill
    step.num_scheduled_tokens["b"] = 100  # "b"'s prefill ends: its first plan is due
    assert p.needs_hidden_states(runner, step)
    p.governor.may_use_skip = lambda rows: False  # layer skip off: no plans
    assert not p.needs_hidden_states(runner, step)
    batch.generators = {1: object()}  # ... except for seeded rows, which always plan when due
    assert p.needs_hidden_states(runner, step)
    batch.generators = {}
    p.governor.may_use_skip = lambda rows: True
    step.num_scheduled_tokens["b"] = 0
    planned.rounds_since_plan = p.cfg.replan_interval  # "a" is due a re-plan
    assert p.needs_hidden_states(runner, step)


def test_drafts_travel_with_the_sampled_tokens_and_save_the_second_rpc():
    import pickle

    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_clasp.patches import KeepDraftsFromSampledTokens, SendDraftsWithSampledTokens, TakeDraftsWithoutRpc
    from vllm_clasp.proposer import ClaspProposer

    # worker: the drafts ride on the output, and survive the pickling between processes
    runner = SimpleNamespace(drafter=object.__new__(ClaspProposer), take_draft_token_ids=lambda: "drafts")
    worker_sample = SendDraftsWithSampledTokens.build(lambda self, g: ModelRunnerOutput(req_ids=["r"], req_id_to_index={"r": 0}))
    out = pickle.loads(pickle.dumps(worker_sample(runner, None)))
    # engine core: kept from the output, handed over once, without the RPC
    rpcs = []
    executor = SimpleNamespace()
    KeepDraftsFromSampledTokens.build(lambda self, g: out)(executor, None)
    take = TakeDraftsWithoutRpc.build(lambda self: rpcs.append(1) or "fetched")
    assert take(executor) == "drafts" and rpcs == []
    assert take(executor) == "fetched" and rpcs == [1]  # nothing kept: the RPC as before
    # other methods: nothing attached, the RPC as before
    runner.drafter = object()
    plain_out = worker_sample(runner, None)
    KeepDraftsFromSampledTokens.build(lambda self, g: plain_out)(executor, None)
    assert take(executor) == "fetched" and rpcs == [1, 1]


def test_rows_to_plan_skips_sequences_about_to_end_and_keeps_seeded_ones():
    from vllm_clasp.proposer import PLAN_HORIZON, rows_to_plan

    due = [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4)]
    since = {0: 1, 1: 40, 2: 1, 3: 90, 4: 1}
    left = {0: 100, 1: 100, 2: PLAN_HORIZON - 1, 3: 5, 4: 3}
    skip = {0, 1, 2, 3, 4}
    # never planned first, then the most overdue; rows about to end drop out once a plan exists
    assert rows_to_plan(due, skip, set(), left, since, True, 8) == [0, 1]
    # ... but not before any plan was made (nothing to draft with otherwise)
    assert rows_to_plan(due, skip, set(), left, since, False, 8) == [0, 2, 4, 3, 1]
    # seeded rows are planned when due whatever is left, and beyond the per-step cap
    assert rows_to_plan(due, skip, {3, 4}, left, since, True, 1) == [4, 3]
    assert rows_to_plan(due, {1, 3}, set(), {}, since, True, 1) == [3]  # only layer-skip rows; no known end


def test_a_seeded_rows_re_plan_waits_for_a_step_that_foresaw_it():
    import numpy as np

    from vllm_clasp.proposer import _SeqState, observe_plan_round, plan_due

    def drifting() -> _SeqState:
        st = _SeqState(keep=np.ones(30, dtype=bool))
        for _ in range(st.fit.base_rounds):
            st.fit.add(4, 4)  # the plan's level: everything accepted
        for _ in range(2):
            st.fit.add(4, 0)
        assert not st.fit.drifted()
        return st

    # One more failed round shows drift: an unseeded row re-plans at once ...
    assert observe_plan_round(drifting(), 99, False, 4, 0) == 1
    # ... a seeded one only from the next step, which needs_hidden_states sees coming.
    st = drifting()
    assert observe_plan_round(st, 99, True, 4, 0) is None
    assert plan_due(st, 99) == 1 and observe_plan_round(st, 99, True, 0, 0) == 1
