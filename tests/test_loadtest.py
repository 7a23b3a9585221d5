"""A small run of the shipped load test: plain and clasp servers under concurrent streaming load
with client disconnects and a KV pool small enough to force preemption."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_loadtest_small(tmp_path):
    out = tmp_path / "lt"
    p = subprocess.run([sys.executable, "-m", "vllm_clasp.cli", "loadtest", "--requests", "10", "--concurrency", "4",
                        "--max-tokens", "64", "--prompt-chars", "400", "--max-model-len", "256", "--num-gpu-blocks", "2",
                        "--abort-frac", "0.3", "--arrival-s", "2", "--out", str(out),
                        # Drafting forced on: the point is drafting under preemption and aborts
                        # (with the governor on, this tiny, prefill-bound load may never draft).
                        "--clasp-config", '{"adaptive": false}'],
                       capture_output=True, text=True, timeout=1200)
    assert (out / "loadtest.md").exists(), p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "loadtest.json").read_text())
    print((out / "loadtest.md").read_text())
    assert report["passed"], json.dumps(report["checks"], indent=1) + p.stdout[-2000:]
    assert p.returncode == 0
    plain, clasp = report["methods"]["plain"]["summary"], report["methods"]["clasp"]["summary"]
    assert report["comparison"]["compared"] >= 5
    assert plain["aborted"] > 0 and plain["aborted"] == clasp["aborted"]
    assert plain["preemptions"] > 0 and clasp["preemptions"] > 0, "the KV pool was not small enough to preempt"
    for s in (plain, clasp):
        assert s["ttft_p50_ms"] and s["e2e_p99_ms"] and s["output_tokens_per_s"] > 0
