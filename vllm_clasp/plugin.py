"""The ``vllm.general_plugins`` entry point: gate on the vLLM version, then apply the patches.

vLLM calls ``register`` once in every process it starts (the API/LLM process, the engine core and
each worker), so it must be cheap and idempotent.
"""

from __future__ import annotations

import functools
import os

from vllm_clasp.config import METHOD

SKIP_VERSION_CHECK_ENV = "VLLM_CLASP_SKIP_VERSION_CHECK"
_registered = False


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def version_supported(version: str) -> bool:
    from vllm_clasp.patches import SUPPORTED_VLLM

    base = version.split("+", 1)[0]
    return base in SUPPORTED_VLLM


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.logger import init_logger

    from vllm_clasp import patches

    logger = init_logger("vllm.vllm_clasp")
    version = vllm_version()
    if not version_supported(version) and os.environ.get(SKIP_VERSION_CHECK_ENV) != "1":
        logger.warning(
            "vllm-clasp was written for vLLM %s and found vLLM %s: the clasp method is disabled "
            "(set %s=1 to try anyway).",
            "/".join(patches.SUPPORTED_VLLM),
            version,
            SKIP_VERSION_CHECK_ENV,
        )
        _refuse_clasp(version)
        return
    patches.apply_all()
    logger.debug("vllm-clasp patches applied: %s", [p.__name__ for p in patches.ALL_PATCHES])


def _refuse_clasp(version: str) -> None:
    """On an unsupported vLLM, asking for clasp fails with a message that says why."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_clasp.patches import SUPPORTED_VLLM

    original = EngineArgs.create_speculative_config

    @functools.wraps(original)
    def create_speculative_config(self, *args, **kwargs):
        sc = self.speculative_config
        if isinstance(sc, dict) and sc.get("method") == METHOD:
            raise ValueError(
                f"speculative_config method 'clasp' needs vLLM {'/'.join(SUPPORTED_VLLM)}; "
                f"this is vLLM {version} (set {SKIP_VERSION_CHECK_ENV}=1 to try anyway)"
            )
        return original(self, *args, **kwargs)

    EngineArgs.create_speculative_config = create_speculative_config
