import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model() -> str:
    from vllm_clasp.models import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def tiny_model(default_model) -> str:
    from vllm_clasp.models import tiny_llama_path

    return str(tiny_llama_path(num_layers=6, hidden_size=64, seed=0))
