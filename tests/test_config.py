"""Option parsing and validation: every bad input names the option and what is allowed."""

from types import SimpleNamespace

import pytest

from vllm_clasp.config import (
    SUPPORTED_ARCHITECTURES,
    ClaspConfig,
    ClaspConfigError,
    check_target,
    parse_clasp_config,
)


def model_cfg(arch="LlamaForCausalLM", layers=30, enc_dec=False, multimodal=False):
    return SimpleNamespace(
        architectures=[arch],
        hf_text_config=SimpleNamespace(num_hidden_layers=layers),
        is_encoder_decoder=enc_dec,
        is_multimodal_model=multimodal,
    )


PAR = SimpleNamespace(pipeline_parallel_size=1, decode_context_parallel_size=1)


def test_defaults_and_passthrough():
    cfg, vk = parse_clasp_config({"method": "clasp"})
    assert cfg == ClaspConfig()
    assert vk == {"method": "clasp", "num_speculative_tokens": cfg.num_speculative_tokens}
    cfg, vk = parse_clasp_config(
        {"method": "clasp", "num-speculative-tokens": 6, "skip_layers": 12, "draft_exit_threshold": 0.5,
         "replan_interval": 8, "disable_by_batch_size": 32}
    )
    assert (cfg.num_speculative_tokens, cfg.skip_layers, cfg.draft_exit_threshold, cfg.replan_interval) == (6, 12, 0.5, 8)
    # vLLM 0.32's SpeculativeConfig has no disable_by_batch_size: clasp keeps it itself
    assert vk == {"method": "clasp", "num_speculative_tokens": 6} and cfg.disable_by_batch_size == 32


def test_skip_layers_count_or_fraction():
    assert ClaspConfig(skip_layers=0.5).num_skip(30) == 15
    assert ClaspConfig(skip_layers=9).num_skip(30) == 9
    assert ClaspConfig(skip_layers=0.99, min_draft_layers=4).num_skip(30) == 26
    assert ClaspConfig(skip_layers=9).num_scratch_blocks(30) == 9
    assert ClaspConfig.from_params(ClaspConfig(skip_layers=3).to_params()) == ClaspConfig(skip_layers=3)


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_speculative_tokens", 0),
        ("num_speculative_tokens", 33),
        ("num_speculative_tokens", 2.5),
        ("skip_layers", -1),
        ("skip_layers", 1.0),
        ("skip_layers", 0.0),
        ("skip_layers", "half"),
        ("skip_layers", True),
        ("draft_exit_threshold", 1.5),
        ("draft_exit_threshold", -0.1),
        ("draft_exit_threshold", float("nan")),
        ("replan_interval", 0),
        ("max_plans_per_step", 0),
        ("min_draft_layers", 0),
        ("disable_by_batch_size", 0),
        ("disable_by_batch_size", 2.0),
        ("self_check", "yes"),
    ],
)
def test_out_of_range_values_name_the_option(key, value):
    with pytest.raises(ClaspConfigError) as e:
        parse_clasp_config({"method": "clasp", key: value})
    assert repr(key) in str(e.value) and "expected" in str(e.value)


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ClaspConfigError) as e:
        parse_clasp_config({"method": "clasp", "skip_layer": 3, "model": "x"})
    msg = str(e.value)
    assert "'skip_layer'" in msg and "'model'" in msg and "skip_layers" in msg and "draft_exit_threshold" in msg


def test_target_checks():
    assert check_target(ClaspConfig(), model_cfg(), PAR) == 30
    for arch in SUPPORTED_ARCHITECTURES:
        check_target(ClaspConfig(), model_cfg(arch), PAR)
    with pytest.raises(ClaspConfigError, match="GPT2LMHeadModel.*supported"):
        check_target(ClaspConfig(), model_cfg("GPT2LMHeadModel"), PAR)
    with pytest.raises(ClaspConfigError, match="skip_layers.*30 decoder layers"):
        check_target(ClaspConfig(skip_layers=30), model_cfg(), PAR)
    with pytest.raises(ClaspConfigError, match="pipeline_parallel_size=1"):
        check_target(ClaspConfig(), model_cfg(), SimpleNamespace(pipeline_parallel_size=2))
    with pytest.raises(ClaspConfigError, match="decoder-only"):
        check_target(ClaspConfig(), model_cfg(enc_dec=True), PAR)


@pytest.mark.parametrize(
    "arch,kw,why",
    [
        ("Gemma3ForConditionalGeneration", dict(multimodal=True), "a multimodal model"),
        ("LlavaForConditionalGeneration", dict(multimodal=True), "a multimodal model"),
        ("WhisperForConditionalGeneration", dict(enc_dec=True, multimodal=True), "an encoder-decoder model"),
        ("BartForConditionalGeneration", dict(enc_dec=True), "an encoder-decoder model"),
        ("Gemma2ForCausalLM", {}, None),
    ],
)
def test_unsupported_structures_name_the_architecture_and_list_supported(arch, kw, why):
    with pytest.raises(ClaspConfigError) as e:
        check_target(ClaspConfig(), model_cfg(arch, **kw), PAR)
    msg = str(e.value)
    assert repr(arch) in msg and "supported: ['LlamaForCausalLM'" in msg and "'Gemma3ForCausalLM'" in msg
    if why:
        assert why in msg


def test_gemma3_text_is_supported():
    assert "Gemma3ForCausalLM" in SUPPORTED_ARCHITECTURES
    assert check_target(ClaspConfig(skip_layers=8), model_cfg("Gemma3ForCausalLM", layers=18), PAR) == 18


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory, default_model):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(default_model)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"method": "clasp", "skip_layers": 6}, r"'skip_layers'\] = 6 .*\[0, 5\]"),
        ({"method": "clasp", "draft_exit_threshold": 2}, r"'draft_exit_threshold'"),
        ({"method": "clasp", "layers_to_skip": 2}, r"unknown speculative_config key\(s\) \['layers_to_skip'\]"),
    ],
)
def test_llm_refuses_bad_options_before_starting(tiny_model, spec, match):
    from vllm import LLM

    with pytest.raises(ClaspConfigError, match=match):
        LLM(model=tiny_model, dtype="float32", enforce_eager=True, speculative_config=spec)


def test_llm_refuses_unsupported_architecture(gpt2_model):
    from vllm import LLM

    with pytest.raises(ClaspConfigError, match=r"GPT2LMHeadModel.*supported: \['LlamaForCausalLM'"):
        LLM(model=gpt2_model, dtype="float32", enforce_eager=True, speculative_config={"method": "clasp"})
