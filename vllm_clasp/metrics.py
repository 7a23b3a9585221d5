"""CLaSp's Prometheus metrics, served on vLLM's ``/metrics`` beside ``vllm:spec_decode_*``.

Where the numbers are made and where they are served differ: the drafter (``ClaspProposer`` and
its ``ClaspStats``) lives in the worker — inside the engine-core process with one GPU/CPU worker,
in separate worker processes with the multiprocessing executor, possibly on other nodes with Ray —
while ``/metrics`` is answered by the API-server process.

Route (vLLM 0.32): pull at scrape time. The ``/metrics`` handlers (wrapped by the
``RefreshClaspMetricsOnScrape`` patch) first asks the engine for the drafter's counters with
vLLM's own ``engine_client.collective_rpc("clasp_stats")``, which reaches every worker through
whatever executor runs them (``WorkerBase.clasp_stats``, added by the ``AddWorkerClaspStats``
patch, returns :func:`snapshot`). Rank 0's snapshot (every tensor-parallel rank makes the same
plans) is kept in :data:`COLLECTOR`, a prometheus_client collector registered in the registry
vLLM serves (``ClaspMetricsRegistry`` patch), which renders the families below. Counters are
cumulative in the worker, so nothing is lost between scrapes and nothing is computed when nobody
scrapes. If the engine does not answer within :data:`RPC_TIMEOUT_S`, the last snapshot is served.

Why not the alternatives: prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
must be set before ``prometheus_client`` is imported in every process, changes how all of vLLM's
own metrics are stored, and cannot see workers on other nodes; carrying the numbers in
``ModelRunnerOutput`` -> ``SchedulerStats`` would need patches to three vLLM classes including the
msgspec-typed engine-core output (unknown fields are dropped on decode).

Metric names follow vLLM's style (``vllm:`` prefix, ``model_name`` and ``engine`` labels).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Iterable

RPC_METHOD = "clasp_stats"
RPC_TIMEOUT_S = 5.0

# Per-plan wall time of the layer planner (seconds).
PLANNING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

ARM_NAMES = {2: "layer_skip", 1: "context", 0: "plain"}

METRIC_NAMES = (
    "vllm:clasp_plans_total",
    "vllm:clasp_planning_seconds",
    "vllm:clasp_layers_skipped",
    "vllm:clasp_draft_exits_total",
    "vllm:clasp_speculation_active",
    "vllm:clasp_rounds_total",
    "vllm:clasp_draft_tokens_total",
    "vllm:clasp_draft_steps_total",
    "vllm:clasp_drafting_seconds_total",
    "vllm:clasp_governor_steps_total",
    "vllm:clasp_scratch_kv_blocks",
)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
def observe_plan(stats: Any, seconds: float) -> None:
    """Count one plan's duration into ``stats.plan_s_hist`` (bucket upper bound -> count)."""
    hist = stats.plan_s_hist
    for b in PLANNING_BUCKETS:
        if seconds <= b:
            hist[b] = hist.get(b, 0) + 1
            return
    hist[float("inf")] = hist.get(float("inf"), 0) + 1


def snapshot(drafter: Any) -> dict[str, Any]:
    """The drafter's cumulative counters as plain, msgpack-safe data (string keys only)."""
    stats = drafter.stats
    out: dict[str, Any] = {}
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        if isinstance(v, dict):
            v = {str(k): v2 for k, v2 in v.items()}
        out[f.name] = v
    gov = getattr(drafter, "governor", None)
    out["last_arm"] = getattr(gov, "_last_arm", None)
    out["governor_enabled"] = bool(getattr(gov, "enabled", False))
    out["steps_by_arm"] = {str(k): int(v) for k, v in (getattr(gov, "steps_by_arm", None) or {}).items()}
    stack = getattr(drafter, "stack", None)
    num_layers = getattr(stack, "num_layers", None)
    out["num_layers"] = num_layers
    out["num_skip"] = getattr(drafter, "num_skip", None)
    try:
        out["scratch_blocks"] = int(drafter.cfg.num_scratch_blocks(num_layers)) if num_layers else None
    except Exception:  # noqa: BLE001 - a stats read must never fail the worker
        out["scratch_blocks"] = None
    out["time"] = time.time()
    return out


def worker_clasp_stats(worker: Any) -> dict[str, Any] | None:
    """``WorkerBase.clasp_stats``: this worker's clasp drafter's snapshot, or None without one."""
    from vllm_clasp.proposer import ClaspProposer

    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    if not isinstance(drafter, ClaspProposer):
        return None
    return snapshot(drafter)


# ---------------------------------------------------------------------------------------------
# API-server side
# ---------------------------------------------------------------------------------------------
class ClaspCollector:
    """prometheus_client collector over the latest snapshot per engine."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.model_name = ""
        self.last_error: str | None = None

    def update(self, engine: str, snap: dict[str, Any], model_name: str) -> None:
        self.snapshots[engine] = snap
        self.model_name = model_name

    def describe(self) -> list:
        return []  # collected lazily: no up-front name registration (avoids clashes)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        if not self.snapshots:
            return
        labels = ["model_name", "engine"]
        plans = CounterMetricFamily("vllm:clasp_plans", "Layer plans made by the CLaSp DP planner.", labels=labels)
        rounds = CounterMetricFamily(
            "vllm:clasp_rounds", "Sequence verification rounds seen by the CLaSp drafter.", labels=labels
        )
        exits = CounterMetricFamily(
            "vllm:clasp_draft_exits",
            "Draft rounds ended early because the draft's top-1 probability fell below draft_exit_threshold.",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "vllm:clasp_draft_tokens",
            "Draft tokens proposed, by source: layer_skip (the target with skipped layers) or context "
            "(prompt lookup).",
            labels=labels + ["source"],
        )
        steps = CounterMetricFamily(
            "vllm:clasp_draft_steps", "Batched layer-skip draft forward passes.", labels=labels
        )
        draft_s = CounterMetricFamily(
            "vllm:clasp_drafting_seconds", "Wall time spent drafting (planning excluded).", labels=labels
        )
        gov = CounterMetricFamily(
            "vllm:clasp_governor_steps",
            "Engine steps by what was drafted: layer_skip (some sequence got layer-skip drafts), context (context drafts only) or plain (none).",
            labels=labels + ["arm"],
        )
        active = GaugeMetricFamily(
            "vllm:clasp_speculation_active",
            "1 if the last step proposed drafts (layer_skip or context), 0 if it decoded plainly.",
            labels=labels,
        )
        scratch = GaugeMetricFamily(
            "vllm:clasp_scratch_kv_blocks", "KV cache blocks held back from the scheduler as planner scratch.",
            labels=labels,
        )
        planning = HistogramMetricFamily(
            "vllm:clasp_planning_seconds", "Wall time of one CLaSp layer plan (DP over layers).", labels=labels
        )
        skipped = HistogramMetricFamily(
            "vllm:clasp_layers_skipped", "Decoder layers skipped by each plan.", labels=labels
        )
        for engine, s in sorted(self.snapshots.items()):
            lv = [self.model_name, engine]
            plans.add_metric(lv, float(s.get("plans", 0)))
            rounds.add_metric(lv, float(s.get("rounds", 0)))
            exits.add_metric(lv, float(s.get("exits", 0)))
            tokens.add_metric(lv + ["layer_skip"], float(s.get("draft_tokens", 0)))
            tokens.add_metric(lv + ["context"], float(s.get("lookup_tokens", 0)))
            steps.add_metric(lv, float(s.get("draft_steps", 0)))
            draft_s.add_metric(lv, float(s.get("draft_s", 0.0)))
            by_arm = s.get("steps_by_arm") or {}
            for arm, name in ARM_NAMES.items():
                gov.add_metric(lv + [name], float(by_arm.get(str(arm), 0)))
            last = s.get("last_arm")
            active.add_metric(lv, 0.0 if last == 0 else 1.0)
            if s.get("scratch_blocks") is not None:
                scratch.add_metric(lv, float(s["scratch_blocks"]))
            # Planning time histogram: per-bucket counts -> cumulative buckets.
            ph = {float(k): int(v) for k, v in (s.get("plan_s_hist") or {}).items()}
            n_plans = int(s.get("plans", 0))
            cum, buckets = 0, []
            for b in PLANNING_BUCKETS:
                cum += ph.get(b, 0)
                buckets.append((_le(b), float(cum)))
            buckets.append(("+Inf", float(max(n_plans, cum + ph.get(float("inf"), 0)))))
            planning.add_metric(lv, buckets, float(s.get("plan_s", 0.0)))
            # Layers skipped: one bucket per count 0..L.
            sh = {int(k): int(v) for k, v in (s.get("skipped_hist") or {}).items()}
            num_layers = int(s.get("num_layers") or (max(sh) if sh else 0))
            cum, buckets, total = 0, [], 0
            for m in range(num_layers + 1):
                cum += sh.get(m, 0)
                buckets.append((_le(m), float(cum)))
            total = sum(sh.values())
            buckets.append(("+Inf", float(total)))
            skipped.add_metric(lv, buckets, float(sum(m * c for m, c in sh.items())))
        yield from (plans, planning, skipped, exits, active, rounds, tokens, steps, draft_s, gov, scratch)


def _le(x: float) -> str:
    return str(float(x))


COLLECTOR = ClaspCollector()
_registered_in: set[int] = set()


def register_collector(registry: Any) -> Any:
    """Add :data:`COLLECTOR` to ``registry`` once; returns the registry."""
    if id(registry) not in _registered_in:
        registry.register(COLLECTOR)
        _registered_in.add(id(registry))
    return registry


async def refresh(engine_client: Any) -> bool:
    """Fetch the drafter's counters from the workers into :data:`COLLECTOR`; False on failure."""
    from vllm_clasp.patches import is_clasp

    cfg = getattr(engine_client, "vllm_config", None)
    if cfg is None or not is_clasp(getattr(cfg, "speculative_config", None)):
        return False
    try:
        results = await asyncio.wait_for(engine_client.collective_rpc(RPC_METHOD), RPC_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - serve the last values rather than fail /metrics
        err = f"{type(e).__name__}: {e}"
        if err != COLLECTOR.last_error:
            from vllm.logger import init_logger

            init_logger("vllm.vllm_clasp").warning("clasp metrics: could not read the drafter's counters: %s", err)
        COLLECTOR.last_error = err
        return False
    snaps = [r for r in (results or []) if isinstance(r, dict)]
    if not snaps:
        return False
    name = cfg.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    COLLECTOR.update("0", snaps[0], str(name))
    COLLECTOR.last_error = None
    return True


class RefreshingMetricsApp:
    """ASGI wrapper for vLLM's ``/metrics`` routes: refresh clasp's numbers, then render."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            app = scope.get("app")
            client = getattr(getattr(app, "state", None), "engine_client", None)
            if client is not None:
                await refresh(client)
        await self.inner(scope, receive, send)


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            continue
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (any labels)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))
