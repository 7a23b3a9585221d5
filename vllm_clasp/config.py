"""CLaSp options: parsed from the ``--speculative-config`` JSON, checked before the engine starts.

vLLM's ``SpeculativeConfig`` forbids unknown keys, so the plugin pops the CLaSp keys out of the
user's dict, validates them here against the target model and parallel setup, and hands vLLM a
plain ``custom_class`` config. The parsed options travel to the workers as a plain dict attached
to that ``SpeculativeConfig`` (``clasp_params``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHOD = "clasp"
PROPOSER_PATH = "vllm_clasp.proposer.ClaspProposer"
PARAMS_ATTR = "clasp_params"

# Decoder-only text architectures whose vLLM model classes expose the shared layer stack
# (``model.layers`` over a residual stream, ``embed_input_ids``, ``norm``, aux hidden states),
# directly or through an adapter in ``drafting.ADAPTERS``. Multimodal wrappers of the same
# decoders (Gemma3ForConditionalGeneration, ...) are not listed: their vision tower and
# merged embeddings are not driven by the draft.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)

# SpeculativeConfig keys that keep their vLLM meaning with clasp. Everything else that vLLM's
# SpeculativeConfig knows (a draft model, its parallelism, quantization, ...) has no meaning for
# a self-speculative method and is refused rather than silently ignored.
PASSTHROUGH_KEYS = ("method", "num_speculative_tokens", "max_model_len")


class ClaspConfigError(ValueError):
    """A clasp option is unknown, out of range, or unsupported for this model/setup."""


@dataclass(frozen=True)
class ClaspConfig:
    """What the user chose; ``resolve`` turns fractions into layer counts for a given model."""

    num_speculative_tokens: int = 8
    """K: most tokens drafted per round (vLLM's own key). The governor proposes fewer where more
    would not pay; context drafts use the whole K at batch size 1 (measured: K 8 beat K 6)."""
    skip_layers: float = 0.4
    """Layers the draft skips: an int count, or a float fraction of the decoder layers in (0, 1)."""
    draft_exit_threshold: float = 0.7
    """Stop drafting a sequence when the draft's top-1 probability falls below this."""
    draft_keep_threshold: float = 0.0
    """The draft that ends a round (below draft_exit_threshold) is still proposed if at least this."""
    lookup_min: int = 1
    lookup_max: int = 6
    """Context drafts: n-gram sizes matched against the sequence's own context (lookup_max=0: off).
    Short matches are kept only while their measured acceptance pays (see lookup.LookupAcceptance)."""
    replan_interval: int = 32
    """Re-run the layer planner for a sequence at the latest after this many verification rounds;
    sooner when its layer-skip drafts are accepted markedly less than just after its last plan."""
    max_plans_per_step: int = 1
    """At most this many sequences are re-planned in one engine step; others wait their turn."""
    min_draft_layers: int = 1
    """Never skip so many layers that fewer than this many remain."""
    draft_vocab: int = 8192
    """Draft LM head over the lowest token ids plus the sequences' context tokens (0: full)."""
    sampled_drafts: bool = True
    """Sampled requests: draw drafts from the draft distribution q and give q to the rejection
    sampler (False: argmax drafts treated as point masses; exact too, accepts less)."""
    adaptive: bool = True
    """Measure decoding speed with and without drafts online; draft only while it pays."""
    disable_by_batch_size: int | None = None
    """No drafts while more requests than this share a step. vLLM 0.32 dropped its own key of
    this name (earlier versions had it), so clasp keeps its meaning itself."""
    self_check: bool = False
    """Debug: after each plan, check the scratch-KV layer runner against the captured states."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    OPTION_DOCS = {
        "num_speculative_tokens": "int in [1, 32]: most tokens drafted per round (K)",
        "skip_layers": "int in [0, L-1] or float in (0, 1): layers skipped by the draft",
        "draft_exit_threshold": "float in [0, 1]: draft top-1 probability below which drafting stops",
        "draft_keep_threshold": "float in [0, 1]: the exiting draft is still proposed if its top-1 probability is at least this",
        "lookup_min": "int >= 1: shortest context n-gram used for zero-cost context drafts",
        "lookup_max": "int >= 0 (>= lookup_min, or 0 = off): longest context n-gram matched",
        "replan_interval": "int >= 1: most verification rounds between two plans of a sequence",
        "max_plans_per_step": "int in [1, 64]: sequences planned in one engine step at most",
        "min_draft_layers": "int >= 1: decoder layers the draft always keeps",
        "draft_vocab": "int >= 0: draft head vocabulary (lowest ids + context tokens; 0 = full)",
        "sampled_drafts": "bool: sampled requests draft from q and pass q to the rejection sampler",
        "adaptive": "bool: turn drafting off while measured plain decoding is faster",
        "disable_by_batch_size": "int >= 1: no drafts while more requests than this share a step",
        "self_check": "bool: verify the planner's layer runner against captured states (debug)",
    }

    def num_skip(self, num_layers: int) -> int:
        """Layers to skip for a model with ``num_layers`` decoder layers."""
        s = self.skip_layers
        m = int(s) if isinstance(s, int) else int(round(s * num_layers))
        return max(0, min(m, num_layers - self.min_draft_layers))

    def num_scratch_blocks(self, num_layers: int) -> int:
        """KV blocks the planner needs as scratch: one per candidate row (plans run one at a time)."""
        return max(1, self.num_skip(num_layers))

    def to_params(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ClaspConfig":
        return cls(**params)


def _err(key: str, allowed: str, got: Any) -> ClaspConfigError:
    return ClaspConfigError(
        f"speculative_config[{key!r}] = {got!r} is not allowed for method 'clasp': expected {allowed}."
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def parse_clasp_config(raw: dict[str, Any]) -> tuple[ClaspConfig, dict[str, Any]]:
    """Split a user's speculative-config dict into ClaspConfig and the keys vLLM keeps.

    Raises ClaspConfigError naming the option and what is allowed.
    """
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if raw.get("method") != METHOD:
        raise ClaspConfigError(f"speculative_config['method'] must be {METHOD!r}")
    ours = {f.name for f in dataclasses.fields(ClaspConfig)} - {"extra", "num_speculative_tokens"}
    unknown = sorted(k for k in raw if k not in ours and k not in PASSTHROUGH_KEYS)
    if unknown:
        allowed = sorted(set(PASSTHROUGH_KEYS) | ours)
        raise ClaspConfigError(
            f"unknown speculative_config key(s) {unknown} for method 'clasp'; "
            f"allowed keys: {allowed}."
        )
    kw: dict[str, Any] = {}
    docs = ClaspConfig.OPTION_DOCS

    k = raw.get("num_speculative_tokens")
    if k is not None:
        if not _is_int(k) or not 1 <= k <= 32:
            raise _err("num_speculative_tokens", docs["num_speculative_tokens"], k)
        kw["num_speculative_tokens"] = k
    s = raw.get("skip_layers")
    if s is not None:
        if _is_int(s):
            if s < 0:
                raise _err("skip_layers", docs["skip_layers"], s)
        elif not (_is_number(s) and 0.0 < s < 1.0):
            raise _err("skip_layers", docs["skip_layers"], s)
        kw["skip_layers"] = s
    d = raw.get("draft_exit_threshold")
    if d is not None:
        if not (_is_number(d) and 0.0 <= d <= 1.0):
            raise _err("draft_exit_threshold", docs["draft_exit_threshold"], d)
        kw["draft_exit_threshold"] = float(d)
    d = raw.get("draft_keep_threshold")
    if d is not None:
        if not (_is_number(d) and 0.0 <= d <= 1.0):
            raise _err("draft_keep_threshold", docs["draft_keep_threshold"], d)
        kw["draft_keep_threshold"] = float(d)
    for key in ("lookup_min", "lookup_max"):
        v = raw.get(key)
        if v is not None:
            if not _is_int(v) or v < (1 if key == "lookup_min" else 0):
                raise _err(key, docs[key], v)
            kw[key] = v
    lmin, lmax = kw.get("lookup_min", ClaspConfig.lookup_min), kw.get("lookup_max", ClaspConfig.lookup_max)
    if lmax and lmax < lmin:
        raise _err("lookup_max", docs["lookup_max"] + f" (lookup_min is {lmin})", lmax)
    u = raw.get("replan_interval")
    if u is not None:
        if not _is_int(u) or u < 1:
            raise _err("replan_interval", docs["replan_interval"], u)
        kw["replan_interval"] = u
    p = raw.get("max_plans_per_step")
    if p is not None:
        if not _is_int(p) or not 1 <= p <= 64:
            raise _err("max_plans_per_step", docs["max_plans_per_step"], p)
        kw["max_plans_per_step"] = p
    m = raw.get("min_draft_layers")
    if m is not None:
        if not _is_int(m) or m < 1:
            raise _err("min_draft_layers", docs["min_draft_layers"], m)
        kw["min_draft_layers"] = m
    b = raw.get("disable_by_batch_size")
    if b is not None:
        if not _is_int(b) or b < 1:
            raise _err("disable_by_batch_size", docs["disable_by_batch_size"], b)
        kw["disable_by_batch_size"] = b
    v = raw.get("draft_vocab")
    if v is not None:
        if not _is_int(v) or v < 0:
            raise _err("draft_vocab", docs["draft_vocab"], v)
        kw["draft_vocab"] = v
    for key in ("self_check", "adaptive", "sampled_drafts"):
        c = raw.get(key)
        if c is not None:
            if not isinstance(c, bool):
                raise _err(key, docs[key], c)
            kw[key] = c

    cfg = ClaspConfig(**kw)
    vllm_keys = {k: raw[k] for k in PASSTHROUGH_KEYS if k in raw}
    vllm_keys["num_speculative_tokens"] = cfg.num_speculative_tokens
    return cfg, vllm_keys


def check_target(cfg: ClaspConfig, model_config: Any, parallel_config: Any) -> int:
    """Refuse models and parallel setups clasp cannot run on; return the decoder layer count."""
    archs = list(getattr(model_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        kind = ""
        if getattr(model_config, "is_encoder_decoder", False):
            kind = " (an encoder-decoder model: clasp supports decoder-only models only)"
        elif getattr(model_config, "is_multimodal_model", False):
            kind = " (a multimodal model: clasp supports text-only decoders)"
        raise ClaspConfigError(
            f"speculative_config method 'clasp' does not support architecture(s) {archs}{kind}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}."
        )
    hf = model_config.hf_text_config
    num_layers = int(hf.num_hidden_layers)
    s = cfg.skip_layers
    if _is_int(s) and s > num_layers - cfg.min_draft_layers:
        raise _err(
            "skip_layers",
            f"an int in [0, {num_layers - cfg.min_draft_layers}] for this model "
            f"({num_layers} decoder layers, min_draft_layers={cfg.min_draft_layers}) "
            "or a float in (0, 1)",
            s,
        )
    if cfg.min_draft_layers > num_layers:
        raise _err("min_draft_layers", f"an int in [1, {num_layers}] for this model", cfg.min_draft_layers)
    pp = getattr(parallel_config, "pipeline_parallel_size", 1)
    if pp != 1:
        raise ClaspConfigError(
            f"speculative_config method 'clasp' needs pipeline_parallel_size=1 (got {pp}): "
            "the draft runs every decoder layer on one pipeline stage."
        )
    dcp = getattr(parallel_config, "decode_context_parallel_size", 1)
    if dcp not in (None, 1):
        raise ClaspConfigError(
            f"speculative_config method 'clasp' needs decode_context_parallel_size=1 (got {dcp})."
        )
    if getattr(model_config, "is_encoder_decoder", False):
        raise ClaspConfigError(
            f"speculative_config method 'clasp' supports decoder-only models only; {archs} is "
            "an encoder-decoder model."
        )
    return num_layers
