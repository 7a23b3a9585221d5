"""Tensor parallelism 2 on the CPU backend (multiprocessing executor): clasp greedy output equals
plain vLLM's at TP2, and both ranks make the same plans.

vLLM's CPU workers bind their OpenMP threads to NUMA nodes by default and refuse to start two local
workers on a one-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local
CPUWorkers"); ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` gives rank 0 core 0 and rank 1 core 1. The tiny
random Llama (4 heads, 2 KV heads) splits over 2 ranks; SmolLM2-135M (9 heads, 3 KV heads) cannot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPEC = {"method": "clasp", "skip_layers": 2, "replan_interval": 1, "draft_exit_threshold": 0.0,
        "num_speculative_tokens": 4, "max_plans_per_step": 8, "self_check": True, "adaptive": False, "lookup_max": 0}


def _run(model, spec, tp=2):
    cpus = os.cpu_count() or 2
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if cpus < 4 else f"0-{cpus // 2 - 1}|{cpus // 2}-{cpus - 1}",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_run.py")), model, str(tp),
                        json.dumps(spec) if spec else "none"], env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in p.stdout.splitlines() if l.startswith("TP_RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(lines[0][len("TP_RESULT "):])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP2 needs 2 CPU cores")
def test_tp2_greedy_identical(tiny_model):
    plain = _run(tiny_model, None)
    clasp = _run(tiny_model, SPEC)
    assert clasp["ids"] == plain["ids"]
    c = clasp["counters"]
    assert c["drafts"] > 0 and c["draft_tokens"] >= 3.5 * c["drafts"], c
    r0, r1 = clasp["stats"]
    assert r0["plans"] > 0 and r0["skipped_hist"] == r1["skipped_hist"] and r0["draft_tokens"] == r1["draft_tokens"]
