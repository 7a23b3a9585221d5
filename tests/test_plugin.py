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
