"""``vllm-clasp loadtest``: plain vLLM and clasp servers under the same concurrent streaming load.

For each method a local OpenAI-compatible server is started (``vllm-clasp serve`` on a free
loopback port, one after the other so they do not share the CPU), with a KV cache small enough to
force preemption (``--num-gpu-blocks-override``; clasp gets its planner-scratch blocks on top, so
both schedulers see the same pool). A bounded number of concurrent streaming clients (completions
and chat, greedy) send the same requests, some of which disconnect after a few chunks (aborts).

Checks: every request completed by both servers has token-identical output; an aborted stream is
a prefix of the other server's output; both servers stay up; afterwards no request is running and
``vllm:kv_cache_usage_perc`` is back to 0 (no leaked KV blocks). Reports throughput and TTFT,
inter-chunk latency (ITL), time per output token and end-to-end latency percentiles; writes
``loadtest.json`` and ``loadtest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vllm_clasp.metrics import metric_sum, parse_prometheus

BLOCK_SIZE_CPU = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``vllm-clasp serve MODEL ...`` on a free loopback port, its log in ``log_dir``."""

    def __init__(
        self,
        model: str,
        spec: dict[str, Any] | None,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        name: str = "server",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "vllm_clasp.cli", "serve", model, "--host", "127.0.0.1",
                "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
                "--gpu-memory-utilization", "0.5", "--served-model-name", "m",
                "--disable-uvicorn-access-log", *extra_args]
        if spec is not None:
            args += ["--speculative-config", json.dumps(spec)]
        self.args = args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 300) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server did not start in {timeout}s; log: {self.log_path}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        return self.metrics_of(self.url)

    @staticmethod
    def metrics_of(url: str) -> dict[str, float]:
        import httpx

        return parse_prometheus(httpx.get(url + "/metrics", timeout=30).text)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
@dataclass
class Req:
    idx: int
    kind: str  # "chat" | "completion"
    prompt: str
    max_tokens: int
    abort_after: int | None  # chunks with content received before disconnecting; None = no abort
    start_delay: float


@dataclass
class Result:
    idx: int
    aborted: bool = False
    ok: bool = False
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)


def make_workload(n: int, max_tokens: int, abort_frac: float, seed: int, arrival_s: float,
                  prompt_chars: int = 1200) -> list[Req]:
    from vllm_clasp.compare import load_spec_bench

    rng = random.Random(seed)
    qs = load_spec_bench(per_category=max(1, (n + 12) // 13))
    rng.shuffle(qs)
    reqs = []
    for i in range(n):
        q = qs[i % len(qs)]
        text = q.text[:prompt_chars]  # bounded prompt length: the small KV pool must hold one request
        abort = rng.randint(0, 4) if rng.random() < abort_frac else None
        kind = "chat" if i % 2 == 0 else "completion"
        prompt = text if kind == "chat" else f"Question: {text}\nAnswer:"
        reqs.append(Req(i, kind, prompt, rng.randint(max(8, max_tokens // 3), max_tokens), abort,
                        rng.uniform(0, arrival_s)))
    return reqs


async def _one(client: Any, url: str, req: Req, t_start: float) -> Result:
    res = Result(req.idx, aborted=req.abort_after is not None)
    await asyncio.sleep(max(0.0, req.start_delay - (time.perf_counter() - t_start)))
    body: dict[str, Any] = {"model": "m", "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
                            "return_token_ids": True}
    if req.kind == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = req.prompt
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            if req.abort_after == 0:
                return res  # disconnect before the first token
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if not ev.get("choices"):
                    continue
                ch = ev["choices"][0]
                ids = ch.get("token_ids") or []
                txt = (ch.get("delta") or {}).get("content") if req.kind == "chat" else ch.get("text")
                if ch.get("finish_reason"):
                    res.finish_reason = ch["finish_reason"]
                if not ids and not txt:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.chunk_gaps.append(now - last)
                last = now
                res.token_ids += ids
                res.text += txt or ""
                chunks += 1
                if req.abort_after is not None and chunks >= req.abort_after:
                    return res  # leaving the block closes the connection: the server aborts it
        res.e2e = time.perf_counter() - t0
        res.ok = True
        res.aborted = False
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, reqs: Sequence[Req], concurrency: int) -> tuple[list[Result], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t_start = time.perf_counter()

        async def guarded(r: Req) -> Result:
            async with sem:
                return await _one(client, url, r, t_start)

        results = await asyncio.gather(*(guarded(r) for r in reqs))
        return list(results), time.perf_counter() - t_start


def pct(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: Sequence[Result], wall: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    toks = sum(len(r.token_ids) for r in results)
    ttft = [r.ttft for r in results if r.ttft is not None]
    itl = [g for r in done for g in r.chunk_gaps]
    e2e = [r.e2e for r in done if r.e2e is not None]
    tpot = [(r.e2e - r.ttft) / (len(r.token_ids) - 1) for r in done
            if r.e2e is not None and r.ttft is not None and len(r.token_ids) > 1]
    out: dict[str, Any] = {
        "requests": len(results), "completed": len(done), "aborted": sum(r.aborted for r in results),
        "errors": sum(r.error is not None for r in results), "output_tokens": toks, "wall_s": wall,
        "output_tokens_per_s": toks / wall if wall > 0 else 0.0,
        "requests_per_s": len(done) / wall if wall > 0 else 0.0,
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = None if not xs else 1000 * pct(xs, q)
    return out


def _wait_drained(srv: LocalServer, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and the KV cache is empty again."""
    t0 = time.time()
    m: dict[str, float] = {}
    while time.time() - t0 < timeout:
        m = srv.metrics()
        busy = metric_sum(m, "vllm:num_requests_running") + metric_sum(m, "vllm:num_requests_waiting")
        if busy == 0 and metric_sum(m, "vllm:kv_cache_usage_perc") == 0:
            return m
        time.sleep(0.5)
    return m


COUNTERS = {
    "preemptions": "vllm:num_preemptions_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "spec_drafts": "vllm:spec_decode_num_drafts_total",
    "spec_draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "spec_accepted": "vllm:spec_decode_num_accepted_tokens_total",
    "clasp_plans": "vllm:clasp_plans_total",
    "clasp_draft_exits": "vllm:clasp_draft_exits_total",
}


def run_method(name: str, model: str, spec: dict[str, Any] | None, reqs: Sequence[Req], args: Any,
               out_dir: Path) -> dict[str, Any]:
    # + 1: vLLM keeps block 0 as its null block; clasp also holds back its planner scratch.
    blocks = args.num_gpu_blocks + 1 + (scratch_blocks(model, spec) if spec is not None else 0)
    extra = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
             "--num-gpu-blocks-override", str(blocks), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    srv = LocalServer(model, spec, out_dir / "logs", extra, name=name,
                      env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)})
    try:
        srv.wait(args.start_timeout)
        # Warm-up outside the measurement.
        asyncio.run(run_load(srv.url, [Req(-1, "completion", "Hello", 4, None, 0.0)], 1))
        before = srv.metrics()
        print(f"[{name}] {len(reqs)} requests, concurrency {args.concurrency} ...", flush=True)
        results, wall = asyncio.run(run_load(srv.url, reqs, args.concurrency))
        after = _wait_drained(srv)
        alive = srv.alive()
        summ = summarize(results, wall)
        for k, metric in COUNTERS.items():
            summ[k] = metric_sum(after, metric) - metric_sum(before, metric)
        summ["kv_cache_usage_after"] = metric_sum(after, "vllm:kv_cache_usage_perc")
        summ["running_after"] = metric_sum(after, "vllm:num_requests_running") + metric_sum(
            after, "vllm:num_requests_waiting")
        summ["server_alive"] = alive
        summ["num_gpu_blocks_override"] = blocks
        if summ["spec_drafts"]:
            summ["tau"] = 1 + summ["spec_accepted"] / summ["spec_drafts"]
        print(f"[{name}] {summ['completed']} completed, {summ['aborted']} aborted, {summ['errors']} errors, "
              f"{summ['output_tokens_per_s']:.1f} tok/s, {summ['preemptions']:.0f} preemptions", flush=True)
        return {"summary": summ, "results": [asdict(r) for r in results], "log": str(srv.log_path)}
    finally:
        srv.stop()


def scratch_blocks(model: str, spec: dict[str, Any]) -> int:
    from vllm_clasp.config import parse_clasp_config

    cfg, _ = parse_clasp_config(spec)
    num_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    return cfg.num_scratch_blocks(int(num_layers))


def compare(plain: Sequence[dict[str, Any]], clasp: Sequence[dict[str, Any]]) -> dict[str, Any]:
    both = mism = prefix_checked = prefix_bad = 0
    bad: list[int] = []
    for a, b in zip(plain, clasp):
        if a["ok"] and b["ok"]:
            both += 1
            if a["token_ids"] != b["token_ids"] or a["text"] != b["text"]:
                mism += 1
                bad.append(a["idx"])
        elif a["token_ids"] and b["token_ids"]:
            x, y = sorted((a["token_ids"], b["token_ids"]), key=len)
            prefix_checked += 1
            if y[: len(x)] != x:
                prefix_bad += 1
                bad.append(a["idx"])
    return {"compared": both, "mismatches": mism, "aborted_prefix_checked": prefix_checked,
            "aborted_prefix_mismatches": prefix_bad, "bad_requests": bad}


def _fmt(x: Any, nd: int = 1) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# vllm-clasp load test", "",
        f"model `{cfg['model']}`; {cfg['requests']} requests (chat and completions, streamed, greedy), "
        f"concurrency {cfg['concurrency']}, up to {cfg['max_tokens']} new tokens, about "
        f"{int(100 * cfg['abort_frac'])} % disconnect early; KV pool {cfg['num_gpu_blocks']} blocks of "
        f"{BLOCK_SIZE_CPU} tokens for requests (clasp: + planner scratch), max_model_len {cfg['max_model_len']}; "
        f"clasp config `{json.dumps(cfg['clasp'])}`.", "",
        "| method | completed | aborted | errors | output tok/s | req/s | TTFT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) "
        "| TPOT p50/p90/p99 (ms) | E2E p50/p90/p99 (s) | preemptions | prefix-cache hits (tokens) | tau |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("plain", "clasp"):
        s = report["methods"][name]["summary"]

        def trio(k: str, scale: float = 1.0, nd: int = 0) -> str:
            return " / ".join(_fmt(None if s[f"{k}_p{q}_ms"] is None else s[f"{k}_p{q}_ms"] * scale, nd)
                              for q in (50, 90, 99))

        lines.append(
            f"| {name} | {s['completed']} | {s['aborted']} | {s['errors']} | {s['output_tokens_per_s']:.1f} | "
            f"{s['requests_per_s']:.2f} | {trio('ttft')} | {trio('itl')} | {trio('tpot')} | "
            f"{trio('e2e', 0.001, 1)} | {s['preemptions']:.0f} | {s['prefix_cache_hits']:.0f} | {_fmt(s.get('tau'), 2)} |")
    c, chk = report["comparison"], report["checks"]
    p, q = report["methods"]["plain"]["summary"], report["methods"]["clasp"]["summary"]
    lines += [
        "",
        f"clasp / plain throughput: **{q['output_tokens_per_s'] / max(p['output_tokens_per_s'], 1e-9):.2f}x**.",
        "",
        f"Completed by both: {c['compared']}, token-identical: {c['compared'] - c['mismatches']}; aborted streams "
        f"checked as prefixes: {c['aborted_prefix_checked']}, bad: {c['aborted_prefix_mismatches']}.",
        "",
        "| check | result |", "|---|---|",
    ]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in chk.items()]
    lines += ["", f"Result: **{'PASS' if report['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-clasp loadtest", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--clasp-config", default="{}", help="extra clasp options as JSON")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--abort-frac", type=float, default=0.2, help="fraction of clients that disconnect early")
    p.add_argument("--arrival-s", type=float, default=5.0, help="request start times spread over this many seconds")
    p.add_argument("--num-gpu-blocks", type=int, default=8,
                   help=f"KV blocks ({BLOCK_SIZE_CPU} tokens each on CPU) the scheduler gets; small forces preemption")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE for the servers (CPU)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="small values chunk long prefills")
    p.add_argument("--prompt-chars", type=int, default=1200, help="Spec-Bench questions cut to this many characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--out", default="out/loadtest", help="directory for loadtest.json, loadtest.md and logs")


def run(args: argparse.Namespace) -> int:
    from vllm_clasp.models import default_model_path

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    model = args.model or str(default_model_path())
    spec = {"method": "clasp", **json.loads(args.clasp_config)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reqs = make_workload(args.requests, args.max_tokens, args.abort_frac, args.seed, args.arrival_s,
                         args.prompt_chars)
    methods = {}
    for name, s in (("plain", None), ("clasp", spec)):
        methods[name] = run_method(name, model, s, reqs, args, out_dir)
    cmp_ = compare(methods["plain"]["results"], methods["clasp"]["results"])
    ps, cs = methods["plain"]["summary"], methods["clasp"]["summary"]
    checks = {
        "greedy outputs token-identical (completed by both)": cmp_["mismatches"] == 0 and cmp_["compared"] > 0,
        "aborted streams are prefixes of the other server's output": cmp_["aborted_prefix_mismatches"] == 0,
        "no request errors": ps["errors"] == 0 and cs["errors"] == 0,
        "servers alive after the load": ps["server_alive"] and cs["server_alive"],
        "no running/waiting requests left": ps["running_after"] == 0 and cs["running_after"] == 0,
        "KV cache usage back to 0 (no leaked blocks)": ps["kv_cache_usage_after"] == 0 and cs["kv_cache_usage_after"] == 0,
        "clasp drafted (spec-decode counters > 0)": cs["spec_drafts"] > 0,
    }
    report = {
        "config": {"model": model, "clasp": spec, "requests": args.requests, "concurrency": args.concurrency,
                   "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars, "abort_frac": args.abort_frac, "arrival_s": args.arrival_s,
                   "num_gpu_blocks": args.num_gpu_blocks, "max_model_len": args.max_model_len,
                   "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                   "seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "methods": methods, "comparison": cmp_, "checks": checks, "passed": all(checks.values()),
    }
    (out_dir / "loadtest.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out_dir / "loadtest.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out_dir / 'loadtest.json'} and {out_dir / 'loadtest.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
