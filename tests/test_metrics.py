"""clasp's Prometheus families (no engine): snapshot -> collector -> exposition; start-up refusals."""

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vllm_clasp import metrics, patches, plugin
from vllm_clasp.config import PROPOSER_PATH
from vllm_clasp.proposer import ClaspStats


def _drafter():
    stats = ClaspStats(rounds=40, plans=3, plan_s=0.03, draft_s=0.5, draft_steps=20, draft_tokens=50, exits=7,
                       lookup_tokens=9, skipped_hist={12: 2, 11: 1})
    for dt in (0.004, 0.009, 0.017):
        metrics.observe_plan(stats, dt)
    gov = SimpleNamespace(_last_arm=2, enabled=True, steps_by_arm={2: 15, 0: 5})
    cfg = SimpleNamespace(num_scratch_blocks=lambda n: 12)
    return SimpleNamespace(stats=stats, governor=gov, stack=SimpleNamespace(num_layers=30), num_skip=12, cfg=cfg)


def test_collector_exposition():
    snap = metrics.snapshot(_drafter())
    assert all(isinstance(k, str) for k in snap["skipped_hist"])  # msgpack-safe
    coll = metrics.ClaspCollector()
    coll.update("0", snap, "m")
    reg = CollectorRegistry()
    reg.register(coll)
    s = metrics.parse_prometheus(generate_latest(reg).decode())
    lab = '{engine="0",model_name="m"}'
    assert s[f"vllm:clasp_plans_total{lab}"] == 3
    assert s[f"vllm:clasp_draft_exits_total{lab}"] == 7
    assert s[f"vllm:clasp_speculation_active{lab}"] == 1
    assert s[f"vllm:clasp_scratch_kv_blocks{lab}"] == 12
    assert s[f"vllm:clasp_planning_seconds_count{lab}"] == 3
    assert s['vllm:clasp_planning_seconds_bucket{engine="0",le="0.005",model_name="m"}'] == 1
    assert s['vllm:clasp_planning_seconds_bucket{engine="0",le="0.01",model_name="m"}'] == 2
    assert s['vllm:clasp_layers_skipped_bucket{engine="0",le="11.0",model_name="m"}'] == 1
    assert s['vllm:clasp_layers_skipped_bucket{engine="0",le="12.0",model_name="m"}'] == 3
    assert s[f"vllm:clasp_layers_skipped_sum{lab}"] == 35
    assert s['vllm:clasp_governor_steps_total{arm="plain",engine="0",model_name="m"}'] == 5
    assert s['vllm:clasp_draft_tokens_total{engine="0",model_name="m",source="context"}'] == 9
    assert metrics.metric_sum(s, "vllm:clasp_governor_steps_total") == 20
    for name in metrics.METRIC_NAMES:
        assert any(k.startswith(name) for k in s), name


def test_empty_collector_exposes_nothing():
    reg = CollectorRegistry()
    reg.register(metrics.ClaspCollector())
    assert b"clasp" not in generate_latest(reg)


def test_refresh_takes_rank0_and_keeps_last_on_failure():
    spec = SimpleNamespace(method="custom_class", model=PROPOSER_PATH)
    cfg = SimpleNamespace(speculative_config=spec, model_config=SimpleNamespace(served_model_name=["m"]))
    snap = metrics.snapshot(_drafter())

    class Client:
        vllm_config = cfg
        fail = False

        async def collective_rpc(self, method):
            assert method == "clasp_stats"
            if self.fail:
                raise RuntimeError("engine dead")
            return [snap, dict(snap, plans=99)]

    c = Client()
    assert asyncio.run(metrics.refresh(c))
    assert metrics.COLLECTOR.snapshots["0"]["plans"] == 3
    c.fail = True
    assert not asyncio.run(metrics.refresh(c))
    assert metrics.COLLECTOR.snapshots["0"]["plans"] == 3 and "engine dead" in metrics.COLLECTOR.last_error
    plain = SimpleNamespace(vllm_config=SimpleNamespace(speculative_config=None))
    assert not asyncio.run(metrics.refresh(plain))


def test_worker_method_and_metrics_patches():
    plugin.register()
    from vllm.entrypoints.serve.instrumentator import metrics as vm
    from vllm.v1.worker.worker_base import WorkerBase

    assert patches.AddWorkerClaspStats.applied()
    assert WorkerBase.clasp_stats(SimpleNamespace(model_runner=SimpleNamespace(drafter=None))) is None
    patches.AddWorkerClaspStats.revert()
    assert not hasattr(WorkerBase, "clasp_stats")
    patches.AddWorkerClaspStats.apply()
    assert hasattr(WorkerBase, "clasp_stats")
    reg = vm.get_prometheus_registry()
    assert metrics.COLLECTOR in reg._collector_to_names
    assert vm.get_prometheus_registry() is reg  # registered once
    # Every /metrics route (the instrumentator's GET route, matched first, and the mount) refreshes.
    from fastapi import FastAPI

    app = FastAPI()
    vm.attach_router(app)
    routes = [r for r in app.routes if getattr(r, "path", None) == "/metrics"]
    assert len(routes) >= 1 and all(isinstance(r.app, metrics.RefreshingMetricsApp) for r in routes)


def test_async_scheduling_refused_clearly(default_model):
    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    from vllm_clasp.config import ClaspConfigError

    args = EngineArgs(model=default_model, speculative_config={"method": "clasp"}, async_scheduling=True)
    with pytest.raises(ClaspConfigError, match="async scheduling"):
        args.create_engine_config()


def test_cpu_rejection_sampler_fixes():
    """vLLM-CPU bugs in the rejection sampler's sampled path, fixed by two patches."""
    import torch

    plugin.register()
    from vllm.v1.sample import rejection_sampler as rs

    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # drafts per request: 2, 0, 3
    temp = torch.tensor([0.5, 0.7, -1.0], dtype=torch.float32)
    out = rs.expand_batch_to_tokens(temp, cu, 5, replace_from=-1.0, replace_to=1)
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    top_k = torch.tensor([1, 5, 7], dtype=torch.int32)
    assert rs.expand_batch_to_tokens(top_k, cu, 5).tolist() == [1, 1, 7, 7, 7]
    meta = SimpleNamespace(all_greedy=False)
    empty = torch.zeros(0, 10)
    assert rs.apply_sampling_constraints(empty, torch.zeros(1, dtype=torch.int32), meta) is empty
