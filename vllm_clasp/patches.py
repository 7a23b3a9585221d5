"""Every change vllm-clasp makes to vLLM internals, one small named class each.

Written against vLLM 0.32.0 (``SUPPORTED_VLLM``); ``plugin.register`` refuses other versions
before applying any of them. Each patch wraps one attribute, keeps the original, is idempotent
(applying twice is a no-op) and can be undone (tests use ``revert``).

CLaSp rides on vLLM's ``custom_class`` speculative method:

* RewriteClaspSpeculativeConfig (process 0): ``{"method": "clasp", ...}`` -> validated
  ClaspConfig + a ``custom_class`` config naming ClaspProposer.
* ClaspLookaheadSlots: reserve K KV slots past the verified tokens, for the draft's K/V writes.
* ClaspGraphHash: compiled-graph cache key differs from plain runs (the graph returns every
  layer's hidden state).
* CaptureAllLayerHiddenStates: the verification forward returns x_0..x_L (vLLM's EAGLE-3 aux
  hidden-state outputs, asked for every layer, through the model family's ``drafting`` adapter).
* CaptureHiddenStatesOnlyForPlans (eager mode): ... but only in steps whose proposal may plan.
* Gemma3AllLayerHiddenStates: the same aux outputs for Gemma3Model, which lacks them in 0.32.
* RouteClaspProposals: the runner calls ClaspProposer.propose_from_runner with the runner, the
  verification metadata and those hidden states.
* ReserveScratchKVBlocks: the scheduler is given a few KV blocks fewer than the workers allocate;
  the planner uses the rest as scratch.
* AddWorkerClaspStats: ``WorkerBase.clasp_stats()``, the drafter's counters, for
  ``collective_rpc("clasp_stats")`` (see metrics.py).
* ClaspMetricsRegistry (API server): the registry vLLM serves on ``/metrics`` also holds clasp's
  collector.
* RefreshClaspMetricsOnScrape (API server): ``/metrics`` first pulls the counters from the workers.
* RefuseAsyncSchedulingWithClasp (process 0): a clear start-up error for ``--async-scheduling``.
* FixCpuExpandBatchToTokens (CPU only): vLLM's CPU rejection sampler expands per-request
  temperature/top-k/top-p into an int64 *copy* and returns the uninitialised original, so every
  sampled speculative request (ngram's too) is verified against garbage-tempered logits.
* SkipSamplingConstraintsWithoutDrafts (CPU only): a step in which no request has drafts still goes
  through the rejection sampler, and vLLM's CPU top-k path fails on the empty draft batch.
* SendDraftsWithSampledTokens, KeepDraftsFromSampledTokens, TakeDraftsWithoutRpc: a step's draft
  tokens travel with its sampled tokens, so the engine core does not fetch them from the worker
  process in a second RPC.
* ReportWaitingRequests (process 0): the scheduler output tells the workers how many requests
  wait for a slot, so the drafter knows whether finishing a sequence sooner lets another start.
* PlainSamplingWithoutDrafts: a clasp step in which no request has drafts is prepared and sampled
  as a plain step (no spec-decode metadata, vLLM's ordinary sampler), so a clasp engine that has
  turned drafting down costs what plain vLLM costs.

Measurement only, not applied by the plugin: ``STEP_TIMING_PATCHES`` time parts of the engine step
for ``vllm-clasp breakdown``.
"""

from __future__ import annotations

import collections
import functools
import importlib
import time
from typing import Any, Callable

from vllm_clasp.config import (
    METHOD,
    PARAMS_ATTR,
    PROPOSER_PATH,
    ClaspConfig,
    check_target,
    parse_clasp_config,
)

SUPPORTED_VLLM = ("0.32.0",)


def is_clasp(spec_config: Any) -> bool:
    return (
        spec_config is not None
        and getattr(spec_config, "method", None) == "custom_class"
        and getattr(spec_config, "model", None) == PROPOSER_PATH
    )


def clasp_config_of(spec_config: Any) -> ClaspConfig:
    return ClaspConfig.from_params(getattr(spec_config, PARAMS_ATTR))


class VllmPatch:
    """Replace ``owner.attr`` with ``build(original)``; remember the original."""

    owner: Any = None
    attr: str = ""

    @classmethod
    def target(cls) -> tuple[Any, str]:
        raise NotImplementedError

    @classmethod
    def build(cls, original: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls) -> None:
        if cls.applied():
            return
        owner, attr = cls.target()
        current = owner.__dict__.get(attr, getattr(owner, attr, None))
        new = cls.build(current)
        marker = new.fget if isinstance(new, property) else new
        marker.__clasp_patch__ = cls.__name__
        marker.__clasp_original__ = current
        setattr(owner, attr, new)

    @classmethod
    def applied(cls) -> bool:
        owner, attr = cls.target()
        cur = owner.__dict__.get(attr, getattr(owner, attr, None))
        cur = cur.fget if isinstance(cur, property) else cur
        return getattr(cur, "__clasp_patch__", None) == cls.__name__

    @classmethod
    def revert(cls) -> None:
        owner, attr = cls.target()
        cur = owner.__dict__.get(attr, getattr(owner, attr, None))
        marker = cur.fget if isinstance(cur, property) else cur
        if getattr(marker, "__clasp_patch__", None) == cls.__name__:
            if marker.__clasp_original__ is None:  # the attribute was added by the patch
                delattr(owner, attr)
            else:
                setattr(owner, attr, marker.__clasp_original__)


class RewriteClaspSpeculativeConfig(VllmPatch):
    """Turn {"method": "clasp", ...} into a validated custom_class config before vLLM sees it."""

    @classmethod
    def target(cls):
        from vllm.engine.arg_utils import EngineArgs

        return EngineArgs, "create_speculative_config"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def create_speculative_config(self, *args: Any, **kwargs: Any):
            sc = self.speculative_config
            if not (isinstance(sc, dict) and str(sc.get("method")) == METHOD):
                return original(self, *args, **kwargs)
            model_config = kwargs.get("target_model_config", args[0] if args else None)
            parallel_config = kwargs.get("target_parallel_config", args[1] if len(args) > 1 else None)
            cfg, vllm_keys = parse_clasp_config(sc)
            check_target(cfg, model_config, parallel_config)
            vllm_keys.update(method="custom_class", model=PROPOSER_PATH)
            self.speculative_config = vllm_keys
            try:
                spec = original(self, *args, **kwargs)
            finally:
                self.speculative_config = sc
            setattr(spec, PARAMS_ATTR, cfg.to_params())
            return spec

        return create_speculative_config


class ClaspLookaheadSlots(VllmPatch):
    """Drafts write K/V up to K positions past the verified range: have the scheduler allocate them."""

    @classmethod
    def target(cls):
        from vllm.config import VllmConfig

        return VllmConfig, "num_lookahead_tokens"

    @classmethod
    def build(cls, original: property) -> property:
        def num_lookahead_tokens(self) -> int:
            spec = self.speculative_config
            if is_clasp(spec):
                return int(spec.num_speculative_tokens)
            return original.fget(self)

        return property(num_lookahead_tokens, doc=original.__doc__)


class ClaspGraphHash(VllmPatch):
    """The compiled graph returns all layers' hidden states: key the compile cache on that."""

    @classmethod
    def target(cls):
        from vllm.config.speculative import SpeculativeConfig

        return SpeculativeConfig, "compute_hash"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def compute_hash(self) -> str:
            h = original(self)
            if is_clasp(self):
                import hashlib

                h = hashlib.sha256(f"{h}|clasp-aux-all-layers".encode()).hexdigest()
            return h

        return compute_hash


def _runner_is_clasp(runner: Any) -> bool:
    from vllm_clasp.proposer import ClaspProposer

    return isinstance(getattr(runner, "drafter", None), ClaspProposer)


class CaptureAllLayerHiddenStates(VllmPatch):
    """Ask the model for x_0..x_L (vLLM's EAGLE-3 aux outputs) from every target forward."""

    @classmethod
    def target(cls):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner, "_setup_eagle3_aux_hidden_state_outputs"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def setup(self) -> None:
            if not _runner_is_clasp(self):
                return original(self)
            from vllm_clasp.drafting import layer_stack

            layer_stack(self.get_model()).capture_all_layers()
            self.use_aux_hidden_state_outputs = True

        return setup


class CaptureHiddenStatesOnlyForPlans(VllmPatch):
    """Switch that capture off for steps whose proposal cannot plan (``ClaspProposer.
    needs_hidden_states``): most steps once plans are made or layer-skip drafting is off, and
    every prefill chunk but a request's last. Decided after vLLM updated the batch for the step,
    before its forward. Eager mode only: a compiled or graph-captured forward keeps the outputs
    it was built with, so there the capture stays on."""

    @classmethod
    def target(cls):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner, "_update_states"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def _update_states(self, scheduler_output):
            out = original(self, scheduler_output)
            if self.model_config.enforce_eager and _runner_is_clasp(self):
                want = self.drafter.needs_hidden_states(self, scheduler_output)
                if want != self.use_aux_hidden_state_outputs:
                    self.drafter.stack.capture_all_layers(want)
                    self.use_aux_hidden_state_outputs = want
            return out

        return _update_states


class Gemma3AllLayerHiddenStates(VllmPatch):
    """vLLM 0.32's Gemma3Model has no EAGLE-3 aux outputs: return x_0..x_L when clasp asks.

    The replacement is vLLM's ``Gemma3Model.forward`` (same loop, same pipeline-stage handling)
    that, when ``clasp_aux_layers`` is set on the model (by ``drafting.Gemma3Stack``), also
    collects ``out + residual`` after the layers named there (0 = the scaled embedding) and
    returns ``(hidden_states, aux)`` like the models with EAGLE-3 support. Unset, it computes
    exactly what vLLM's does. It is a whole function, not a wrapper, and carries vLLM's
    qualified name: torch.compile's AOT cache pickles the compiled forward by reference, which
    fails for a wrapper that closes over the replaced function.
    """

    @classmethod
    def target(cls):
        from vllm.model_executor.models.gemma3 import Gemma3Model

        return Gemma3Model, "forward"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        from itertools import islice

        from vllm.distributed import get_pp_group
        from vllm.sequence import IntermediateTensors

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            layers = getattr(self, "clasp_aux_layers", ())
            if get_pp_group().is_first_rank:
                hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
                residual = None
            else:
                assert intermediate_tensors is not None
                hidden_states = intermediate_tensors["hidden_states"]
                residual = intermediate_tensors["residual"]
            aux = [hidden_states] if 0 in layers else []
            for idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):
                hidden_states, residual = layer(positions, hidden_states, residual, **kwargs)
                if idx + 1 in layers:
                    aux.append(hidden_states + residual)
            if not get_pp_group().is_last_rank:
                return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
            hidden_states, _ = self.norm(hidden_states, residual)
            return (hidden_states, aux) if layers else hidden_states

        forward.__module__ = original.__module__
        forward.__qualname__ = original.__qualname__
        forward.__doc__ = original.__doc__
        forward.__annotations__ = dict(getattr(original, "__annotations__", {}))
        return forward


class RouteClaspProposals(VllmPatch):
    """Give the clasp drafter the runner, verification metadata and captured hidden states."""

    @classmethod
    def target(cls):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner, "propose_draft_token_ids"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def propose_draft_token_ids(
            self,
            scheduler_output,
            sampled_token_ids,
            sampling_metadata,
            hidden_states,
            sample_hidden_states,
            aux_hidden_states,
            spec_decode_metadata,
            common_attn_metadata,
            slot_mappings,
        ):
            if not _runner_is_clasp(self):
                return original(
                    self,
                    scheduler_output,
                    sampled_token_ids,
                    sampling_metadata,
                    hidden_states,
                    sample_hidden_states,
                    aux_hidden_states,
                    spec_decode_metadata,
                    common_attn_metadata,
                    slot_mappings,
                )
            self._draft_probs = None
            self._draft_prob_req_ids = None
            return self.drafter.propose_from_runner(
                self,
                scheduler_output,
                sampled_token_ids,
                aux_hidden_states,
                spec_decode_metadata,
                common_attn_metadata,
            )

        return propose_draft_token_ids


class ReserveScratchKVBlocks(VllmPatch):
    """Keep the last few KV blocks away from the scheduler: the planner's scratch space.

    The workers allocate ``num_blocks`` blocks; the scheduler's pool is told ``num_blocks - R``,
    so block ids ``[num_blocks - R, num_blocks)`` are never given to a request.
    """

    @classmethod
    def target(cls):
        from vllm.v1.engine.core import EngineCore

        return EngineCore, "_initialize_kv_caches"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def _initialize_kv_caches(self, vllm_config):
            cfg = original(self, vllm_config)
            spec = vllm_config.speculative_config
            if is_clasp(spec):
                num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
                reserve = clasp_config_of(spec).num_scratch_blocks(num_layers)
                if cfg.num_blocks - reserve < 2:
                    raise ValueError(
                        f"KV cache too small for clasp: {cfg.num_blocks} blocks, {reserve} needed as "
                        "planner scratch; raise the KV cache size (VLLM_CPU_KVCACHE_SPACE / "
                        "gpu_memory_utilization) or lower skip_layers / max_plans_per_step"
                    )
                cfg.num_blocks -= reserve
                vllm_config.cache_config.num_gpu_blocks = cfg.num_blocks
                from vllm.logger import init_logger

                init_logger("vllm.vllm_clasp").info(
                    "clasp: %d KV blocks reserved as planner scratch (%d left for requests)",
                    reserve,
                    cfg.num_blocks,
                )
            return cfg

        return _initialize_kv_caches


class AddWorkerClaspStats(VllmPatch):
    """``worker.clasp_stats()``: the drafter's counters, reachable by ``collective_rpc`` from any
    executor (in-process, multiprocessing, Ray). None on workers without a clasp drafter."""

    @classmethod
    def target(cls):
        from vllm.v1.worker.worker_base import WorkerBase

        return WorkerBase, "clasp_stats"

    @classmethod
    def build(cls, original: Callable | None) -> Callable:
        def clasp_stats(self) -> dict | None:
            from vllm_clasp.metrics import worker_clasp_stats

            return worker_clasp_stats(self)

        return clasp_stats


class ClaspMetricsRegistry(VllmPatch):
    """The registry the API server serves on ``/metrics`` (the default one, or the multiprocess
    one with several API servers) also holds clasp's collector (empty unless clasp runs)."""

    @classmethod
    def target(cls):
        from vllm.entrypoints.serve.instrumentator import metrics

        return metrics, "get_prometheus_registry"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def get_prometheus_registry():
            from vllm_clasp.metrics import register_collector

            return register_collector(original())

        return get_prometheus_registry


class RefreshClaspMetricsOnScrape(VllmPatch):
    """Wrap the ``/metrics`` routes: each scrape first pulls the drafter's counters from the workers
    (``collective_rpc("clasp_stats")``, a few ms between two engine steps)."""

    @classmethod
    def target(cls):
        from vllm.entrypoints.serve.instrumentator import metrics

        return metrics, "attach_router"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def attach_router(app) -> None:
            original(app)
            from vllm_clasp.metrics import RefreshingMetricsApp

            # Both the instrumentator's GET /metrics route (matched first) and the /metrics mount.
            for route in app.routes:
                if getattr(route, "path", None) == "/metrics" and hasattr(route, "app"):
                    if not isinstance(route.app, RefreshingMetricsApp):
                        route.app = RefreshingMetricsApp(route.app)

        return attach_router


class RefuseAsyncSchedulingWithClasp(VllmPatch):
    """vLLM refuses async scheduling for ``custom_class`` drafters with a message that names
    ``custom_class``; say ``clasp`` and why, before anything else starts."""

    @classmethod
    def target(cls):
        from vllm.engine.arg_utils import EngineArgs

        return EngineArgs, "create_engine_config"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def create_engine_config(self, *args: Any, **kwargs: Any):
            sc = self.speculative_config
            if isinstance(sc, dict) and str(sc.get("method")) == METHOD and getattr(self, "async_scheduling", None):
                from vllm_clasp.config import ClaspConfigError

                raise ClaspConfigError(
                    "speculative_config method 'clasp' cannot run with async scheduling "
                    "(--async-scheduling): the drafter needs the verified tokens and hidden states "
                    "of step t before step t+1 is scheduled. Leave async scheduling off."
                )
            return original(self, *args, **kwargs)

        return create_engine_config


class FixCpuExpandBatchToTokens(VllmPatch):
    """vLLM 0.32 CPU bug: ``expand_batch_to_tokens`` runs ``cpu_triton_utils._expand_kernel_impl``,
    which converts the float output buffer to int64, fills the copy and drops it, leaving
    ``temperature``/``top_p`` per draft token as uninitialised memory. Sampled requests with drafts
    then accept almost nothing and are not reproducible. Same result as the Triton kernel, in torch.
    """

    @classmethod
    def target(cls):
        from vllm.v1.sample import rejection_sampler

        return rejection_sampler, "expand_batch_to_tokens"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
            if x.device.type != "cpu":
                return original(x, cu_num_tokens, num_tokens, replace_from, replace_to)
            return expand_per_token(x, cu_num_tokens, num_tokens, replace_from, replace_to)

        return expand_batch_to_tokens


def expand_per_token(x, cu_num_tokens, num_tokens: int, replace_from=0, replace_to=0):
    """[a, b, c] with cu [2, 5, 6] -> [a, a, b, b, b, c]; entries equal to replace_from become
    replace_to (vLLM's expand_kernel semantics)."""
    import torch

    cu = cu_num_tokens.to(torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(x, counts, output_size=int(num_tokens))


class SkipSamplingConstraintsWithoutDrafts(VllmPatch):
    """vLLM 0.32 CPU bug: with speculative decoding every step's sampling goes through the
    rejection sampler; when no request in the step has a draft, ``apply_sampling_constraints`` gets
    zero rows and the CPU top-k path (``apply_top_k_only``) calls ``max()`` on an empty tensor, so
    any request with ``top_k`` crashes the engine (ngram's too). Zero rows need no constraints.
    """

    @classmethod
    def target(cls):
        from vllm.v1.sample import rejection_sampler

        return rejection_sampler, "apply_sampling_constraints"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
            if logits.shape[0] == 0:
                return logits
            return original(logits, cu_num_draft_tokens, sampling_metadata)

        return apply_sampling_constraints


class PlainSamplingWithoutDrafts(VllmPatch):
    """vLLM 0.32 builds spec-decode metadata and runs the rejection sampler in every step once a
    speculative method is configured, drafts or not: ~0.5 ms per step at batch 16 on CPU, a few
    percent of a step that the governor, when it stops drafting, cannot win back. A step without
    drafts is a plain step; prepare it as one. Exact: greedy and random sampling of one token per
    request is what the rejection sampler does with no drafts. Left alone: steps with seeded
    requests (their generators advance per sampler, so both paths must not mix for them) and
    models with recurrent layers (their kernels read the speculative offsets).
    """

    @classmethod
    def target(cls):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner, "_prepare_inputs"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def _prepare_inputs(self, scheduler_output, *args: Any, **kwargs: Any):
            spec = self.speculative_config
            if (
                spec is None
                or scheduler_output.scheduled_spec_decode_tokens
                or self.input_batch.generators
                or not _runner_is_clasp(self)
                or getattr(self.model_config, "is_hybrid", False)
            ):
                return original(self, scheduler_output, *args, **kwargs)
            self.speculative_config = None
            try:
                return original(self, scheduler_output, *args, **kwargs)
            finally:
                self.speculative_config = spec

        return _prepare_inputs


DRAFTS_ATTR = "clasp_draft_token_ids"


class SendDraftsWithSampledTokens(VllmPatch):
    """Worker side of one inter-process round trip less per step. With a speculative method, vLLM
    0.32's engine core asks the workers for the step's draft tokens in a second RPC after the
    sampled tokens arrive (``take_draft_token_ids``). On CPU the worker is its own process
    (vLLM's multiprocessing executor) and that round trip costs a few per cent of a decode step
    at batch 8. clasp proposes inside ``sample_tokens``: attach the drafts to its output (the
    same value the RPC would fetch next, nothing runs in between)."""

    @classmethod
    def target(cls):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner, "sample_tokens"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        from vllm.v1.outputs import ModelRunnerOutput

        @functools.wraps(original)
        def sample_tokens(self, *args: Any, **kwargs: Any):
            out = original(self, *args, **kwargs)
            if type(out) is ModelRunnerOutput and _runner_is_clasp(self):
                setattr(out, DRAFTS_ATTR, (self.take_draft_token_ids(),))
            return out

        return sample_tokens


class KeepDraftsFromSampledTokens(VllmPatch):
    """Engine-core side: keep the drafts that came with the sampled tokens ..."""

    @classmethod
    def target(cls):
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor, "sample_tokens"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def sample_tokens(self, *args: Any, **kwargs: Any):
            out = original(self, *args, **kwargs)
            self.__dict__[DRAFTS_ATTR] = getattr(out, DRAFTS_ATTR, None)
            return out

        return sample_tokens


class TakeDraftsWithoutRpc(VllmPatch):
    """... and hand them to the scheduler without the second RPC (which it still makes when no
    drafts came along: other methods, or a step whose output was not a plain ModelRunnerOutput)."""

    @classmethod
    def target(cls):
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor, "take_draft_token_ids"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def take_draft_token_ids(self):
            kept = self.__dict__.pop(DRAFTS_ATTR, None)
            return kept[0] if kept is not None else original(self)

        return take_draft_token_ids


WAITING_ATTR = "clasp_waiting"


class ReportWaitingRequests(VllmPatch):
    """Workers see the scheduled batch, not the queue behind it. With requests waiting, a token
    accepted now frees a slot sooner (throughput); with none, the batch ends when its slowest
    sequence does. Put the queue length on the scheduler output (``clasp_waiting``)."""

    @classmethod
    def target(cls):
        from vllm.v1.core.sched.scheduler import Scheduler

        return Scheduler, "schedule"

    @classmethod
    def build(cls, original: Callable) -> Callable:
        @functools.wraps(original)
        def schedule(self, *args: Any, **kwargs: Any):
            out = original(self, *args, **kwargs)
            if is_clasp(getattr(self.vllm_config, "speculative_config", None)):
                setattr(out, WAITING_ATTR, len(self.waiting))
            return out

        return schedule


ALL_PATCHES: tuple[type[VllmPatch], ...] = (
    RewriteClaspSpeculativeConfig,
    ClaspLookaheadSlots,
    ClaspGraphHash,
    CaptureAllLayerHiddenStates,
    CaptureHiddenStatesOnlyForPlans,
    Gemma3AllLayerHiddenStates,
    RouteClaspProposals,
    ReserveScratchKVBlocks,
    FixCpuExpandBatchToTokens,
    SkipSamplingConstraintsWithoutDrafts,
    PlainSamplingWithoutDrafts,
    SendDraftsWithSampledTokens,
    KeepDraftsFromSampledTokens,
    TakeDraftsWithoutRpc,
    ReportWaitingRequests,
    AddWorkerClaspStats,
    ClaspMetricsRegistry,
    RefreshClaspMetricsOnScrape,
    RefuseAsyncSchedulingWithClasp,
)


def apply_all() -> None:
    for p in ALL_PATCHES:
        p.apply()


# Measurement only ------------------------------------------------------------------------------
# Not in ALL_PATCHES: ``vllm-clasp breakdown`` applies these around its own in-process engines and
# reverts them. Each adds the seconds spent in one method to ``STEP_TIMES[part]``.

STEP_TIMES: collections.defaultdict[str, float] = collections.defaultdict(float)


def _step_timer(module: str, owner: str, attr: str, part: str) -> type[VllmPatch]:
    class TimeStepPart(VllmPatch):
        @classmethod
        def target(cls):
            return getattr(importlib.import_module(module), owner), attr

        @classmethod
        def build(cls, original: Callable) -> Callable:
            @functools.wraps(original)
            def timed(self, *args: Any, **kwargs: Any):
                t0 = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    STEP_TIMES[part] += time.perf_counter() - t0

            return timed

    TimeStepPart.__name__ = TimeStepPart.__qualname__ = f"Time{owner}{attr.title().replace('_', '')}"
    return TimeStepPart


STEP_TIMING_PATCHES: tuple[type[VllmPatch], ...] = (
    _step_timer("vllm.v1.engine.core", "EngineCore", "step", "step"),
    _step_timer("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward", "forward"),
    _step_timer("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs", "prepare"),
    _step_timer("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_sample", "sampler"),
    _step_timer("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_bookkeeping_sync", "bookkeeping"),
)
