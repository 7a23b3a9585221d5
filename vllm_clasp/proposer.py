"""ClaspProposer: ties the planner and the skip-layer drafter to vLLM's model runner.

vLLM builds it as a ``custom_class`` proposer. The plugin's runner patch calls
``propose_from_runner`` instead of the custom-class ``propose`` so that it gets what a layer-skip
drafter needs and the custom-class API does not pass: the runner (model, KV cache, metadata
builders), the verification step's attention metadata and the per-layer hidden states captured
during verification.

Per round and sequence: find the last accepted token of the verification just run; if the
sequence is due a plan (after prefill, then when its layer-skip drafts are accepted markedly less
than just after its last plan, ``PlanFit``, or at the latest every ``replan_interval`` rounds),
run the DP on that token's captured states; then draft up to K tokens with the planned layers
skipped, stopping at the first draft whose top-1 probability is below ``draft_exit_threshold``.
vLLM's rejection sampler verifies the drafts in the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger

from vllm_clasp.config import PARAMS_ATTR, ClaspConfig
from vllm_clasp.patches import WAITING_ATTR
from vllm_clasp.governor import LOOKUP, PLAIN, SKIP, Governor, critical_rows, joint_shares, last_shares
from vllm_clasp.lookup import (LONG_MATCHES, WAVE_MAX_SCALE, LookupAcceptance, OccurrenceChoice, SeqAcceptance,
                               lookup_matches)
from vllm_clasp.drafting import (DraftHead, KVGroup, LayerStack, ScratchLayerRunner, draft_step, foreign_context_columns,
                                 kv_group_from_runner, layer_stack)
from vllm_clasp.metrics import observe_plan
from vllm_clasp.planner import plan_skip_layers, skip_mask

logger = init_logger(f"vllm.{__name__}")


PLAN_HORIZON = 16
"""Tokens a sequence must have left (max_tokens, model length) for a new plan (governor on)."""


@dataclass
class PlanFit:
    """How a sequence's layer-skip drafts fare under its current plan, for re-planning when the
    plan stops fitting the text rather than only by the clock.

    The first ``base_rounds`` rounds with layer-skip drafts after a plan give its level; later
    rounds a decayed recent level. The plan has drifted when the recent acceptance is both
    ``drop`` below that level and lower than chance allows (a one-sided two-proportion test at
    ``z``; both levels come from a few tokens): drafts of one to three tokens a round make a
    single bad round meaningless, and a plan costs one to two full forwards."""

    base_rounds: int = 4
    drop: float = 0.25
    decay: float = 0.8
    min_recent_tokens: float = 8.0
    z: float = 2.5
    rounds: int = 0
    base_drafted: float = 0.0
    base_accepted: float = 0.0
    recent_drafted: float = 0.0
    recent_accepted: float = 0.0

    def add(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.rounds += 1
        if self.rounds <= self.base_rounds:
            self.base_drafted += drafted
            self.base_accepted += accepted
        else:
            self.recent_drafted = self.recent_drafted * self.decay + drafted
            self.recent_accepted = self.recent_accepted * self.decay + accepted

    def drifted(self) -> bool:
        if self.rounds <= self.base_rounds or self.recent_drafted < self.min_recent_tokens:
            return False
        nb, nr = self.base_drafted, self.recent_drafted
        pb, pr = self.base_accepted / nb, self.recent_accepted / nr
        if pr >= (1.0 - self.drop) * pb:
            return False
        # Both levels are estimates from a few tokens: a two-proportion test, one-sided.
        p = (self.base_accepted + self.recent_accepted + 1.0) / (nb + nr + 2.0)
        return pb - pr > self.z * (p * (1.0 - p) * (1.0 / nb + 1.0 / nr)) ** 0.5


def rows_to_plan(due: list[tuple[int, int]], skip_rows: set[int], pinned: set[int], left: dict[int, int],
                 since: dict[int, int], have_fallback: bool, max_plans: int) -> list[int]:
    """Rows to plan this step, from ``due`` ((0 never planned | 1 overdue, row)): only rows
    drafting from the layer-skip model; never-planned first, then the most overdue; at most
    ``max_plans``, and every pinned (seeded) row. A plan costs one to two full forwards, so a row
    with fewer than ``PLAN_HORIZON`` tokens left (``left``; rows not in it have no known end)
    cannot earn it back: it drafts with its last plan, or the latest one made, if there is one."""
    rows = [
        d for d in due
        if d[1] in skip_rows and (d[1] in pinned or left.get(d[1], PLAN_HORIZON) >= PLAN_HORIZON or not have_fallback)
    ]
    rows.sort(key=lambda t: (t[1] not in pinned, t[0], -since[t[1]]))
    budget = max(max_plans, sum(1 for d in rows if d[1] in pinned))
    return [i for _, i in rows[:budget]]


@dataclass
class _SeqState:
    keep: torch.Tensor | None = None  # [L] bool, layers the draft runs
    rounds_since_plan: int = 0
    fit: PlanFit = field(default_factory=PlanFit)  # its layer-skip acceptance since the plan
    lookup_n: int = 0  # n-gram length behind the context draft proposed last round (0: none)
    proposal: tuple[np.ndarray, int] | None = None  # last round's whole context match and its n, drafted or not
    rivals: tuple[np.ndarray, np.ndarray] | None = None  # last round's matches at the latest and the earliest occurrence
    occurrence: OccurrenceChoice = field(default_factory=OccurrenceChoice)
    lookup_expect: float = 0.0  # the chances of that draft's tokens, summed
    skip_drafted: bool = False  # last round's draft came from the layer-skip model
    lookup: SeqAcceptance = field(default_factory=SeqAcceptance)


def plan_due(st: _SeqState, interval: int) -> int | None:
    """Is the sequence due a plan: 0 never planned, 1 its plan is older than ``interval`` rounds
    or has drifted (``PlanFit``); None not due."""
    if st.keep is None:
        return 0
    if st.rounds_since_plan > interval or st.fit.drifted():
        return 1
    return None


def observe_plan_round(st: _SeqState, interval: int, seeded: bool, drafted: int, accepted: int) -> int | None:
    """Add a round's layer-skip drafts to the plan's fit; is a plan due now (``plan_due``)?

    A seeded row is due only as ``ClaspProposer.needs_hidden_states`` foresaw before the step;
    drift this round reveals counts from the next step. Otherwise whether it re-plans now would
    hang on other rows having made this step capture hidden states, and with the plan its drafts
    and its random stream (CI, session 22: a seeded request did not reproduce)."""
    foreseen = plan_due(st, interval)
    st.fit.add(drafted, accepted)
    return foreseen if seeded else plan_due(st, interval)


@dataclass
class ClaspStats:
    """Counters since start; read by the metrics exporter and the benchmark."""

    rounds: int = 0
    plans: int = 0
    plan_s: float = 0.0
    draft_s: float = 0.0
    draft_steps: int = 0
    draft_tokens: int = 0
    draft_rows: int = 0  # sum over draft steps of rows drafted
    layers_run: int = 0  # sum over draft steps and rows of layers run
    exits: int = 0  # rounds ended by the draft-exit threshold
    lookup_rounds: int = 0  # sequence-rounds drafted from the context (no layer-skip draft)
    lookup_tokens: int = 0
    lookup_expected: float = 0.0  # sum of the chances of verified context-draft tokens
    lookup_accepted: int = 0  # context-draft tokens accepted (calibration: against lookup_expected)
    lookup_earliest: int = 0  # of lookup_rounds, those copying the match's earliest occurrence (OccurrenceChoice)
    skipped_hist: dict[int, int] = field(default_factory=dict)
    plan_s_hist: dict[float, int] = field(default_factory=dict)  # see metrics.observe_plan


class ClaspProposer:
    def __init__(self, vllm_config: VllmConfig):
        spec = vllm_config.speculative_config
        params = getattr(spec, PARAMS_ATTR, None)
        if params is None:
            raise RuntimeError(
                "ClaspProposer was built without clasp parameters: use "
                "speculative_config={'method': 'clasp', ...} with the vllm-clasp plugin loaded, "
                "not method='custom_class' directly."
            )
        self.vllm_config = vllm_config
        self.cfg = ClaspConfig.from_params(params)
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.stack: LayerStack | None = None
        self.head: DraftHead | None = None
        self.kv: KVGroup | None = None
        self.num_skip = 0
        self.seqs: dict[str, _SeqState] = {}
        self.fallback_keep: torch.Tensor | None = None
        self.stats = ClaspStats()
        self.governor = Governor(enabled=self.cfg.adaptive)
        self.lookup_acceptance = LookupAcceptance()

    # vLLM's custom-class hooks ------------------------------------------------------------
    def load_model(self, target_model: Any) -> None:
        self._bind_model(target_model)

    def propose(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        raise RuntimeError(
            "ClaspProposer.propose was called through vLLM's custom_class path: the vllm-clasp "
            "runner patch is not active in this worker (is the plugin installed and loaded?)"
        )

    # -------------------------------------------------------------------------------------
    def _bind_model(self, model: Any) -> None:
        if self.stack is None or self.stack.model is not model:
            self.stack = layer_stack(model)
            self.head = DraftHead(self.stack, self.cfg.draft_vocab)
            self.num_skip = self.cfg.num_skip(self.stack.num_layers)
            self.kv = None

    def _bind_runner(self, runner: Any) -> None:
        self._bind_model(runner.get_model())
        if self.kv is None:
            assert self.stack is not None
            self.kv = kv_group_from_runner(runner, self.stack, self.cfg.num_scratch_blocks(self.stack.num_layers))

    @torch.inference_mode()
    def propose_from_runner(
        self,
        runner: Any,
        scheduler_output: Any,
        sampled_token_ids: list[list[int]],
        aux_hidden_states: list[torch.Tensor] | None,
        spec_decode_metadata: Any,
        common_attn_metadata: Any,
    ) -> list[list[int]]:
        now = time.perf_counter()
        self._bind_runner(runner)
        stack, kv = self.stack, self.kv
        assert stack is not None and kv is not None
        for rid in scheduler_output.finished_req_ids:
            self.seqs.pop(rid, None)
        batch = runner.input_batch
        req_ids: list[str] = list(batch.req_ids)
        n = len(req_ids)
        drafts: list[list[int]] = [[] for _ in range(n)]
        # None: this step's forward did not capture them (needs_hidden_states said no plan can
        # follow); rows due a plan keep their old one (or the fallback) until a step that does.
        if aux_hidden_states is not None and len(aux_hidden_states) != stack.num_layers + 1:
            raise RuntimeError("clasp: per-layer hidden states were not captured in verification")

        num_tokens = np.asarray(batch.num_tokens_no_spec[:n], dtype=np.int64)
        qsl = common_attn_metadata.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens

        active: list[int] = []
        last_idx: dict[int, int] = {}
        due: list[tuple[int, int]] = []
        committed, measurable = 0, True
        work = 0.0  # verified tokens times their context: the step's attention (governor.StepCost)
        skip_rows_v = skip_drafted_v = skip_accepted_v = 0
        sampling = _SamplingRows.from_runner(runner, req_ids, num_tokens, self.k, self.cfg.sampled_drafts)
        for i, rid in enumerate(req_ids):
            if i >= len(sampled_token_ids) or not sampled_token_ids[i]:
                measurable = False  # a partial prefill shares this step
                if rid in self.seqs:
                    self.seqs[rid].proposal = self.seqs[rid].rivals = None
                continue  # partial prefill or discarded: nothing to draft from
            num_draft = len(spec_tokens.get(rid, ()))
            n_sched = int(qsl[i + 1] - qsl[i])
            committed += len(sampled_token_ids[i])
            work += n_sched * float(num_tokens[i])
            if n_sched - num_draft > 1:
                measurable = False  # a prefill finished in this step
            last_idx[i] = int(qsl[i]) + (n_sched - 1 - num_draft) + (len(sampled_token_ids[i]) - 1)
            st = self.seqs.setdefault(rid, _SeqState())
            st.rounds_since_plan += 1
            if st.proposal is not None:
                self.lookup_acceptance.observe(sampling.is_random(i), st.proposal[1], st.proposal[0],
                                               sampled_token_ids[i], st.lookup)
                st.proposal = None
            if st.rivals is not None:
                st.occurrence.observe(*st.rivals, sampled_token_ids[i])
                st.rivals = None
            if st.lookup_n and num_draft:
                self.stats.lookup_expected += st.lookup_expect
                self.stats.lookup_accepted += len(sampled_token_ids[i]) - 1
            if st.skip_drafted:
                skip_rows_v += 1
                skip_drafted_v += num_draft
                skip_accepted_v += len(sampled_token_ids[i]) - 1
            why = observe_plan_round(st, self.cfg.replan_interval, sampling.is_seeded(i),
                                     num_draft if st.skip_drafted else 0, len(sampled_token_ids[i]) - 1)
            st.lookup_n, st.lookup_expect, st.skip_drafted = 0, 0.0, False
            if why is not None:
                due.append((why, i))
            active.append(i)
        self.stats.rounds += len(active)
        self.governor.observe(committed, measurable, now, scheduled=int(qsl[n] - qsl[0]), rows=len(active),
                              work=work / 1000.0)
        self.governor.observe_skip(skip_rows_v, skip_drafted_v, skip_accepted_v)
        if not active:
            return drafts
        cap = self.cfg.disable_by_batch_size
        if cap is not None and n > cap:
            end = time.perf_counter()
            self.governor.finish(PLAIN, 0.0, end - now, end)
            return drafts
        # Seeded sampled requests always draft in full and are planned as soon as due: their
        # random stream depends on how many drafts they get, so that must not depend on timing
        # or on which other requests share the step.
        use_skip = self.governor.use_skip(len(active))
        pinned = {i for i in active if sampling.is_seeded(i)}
        # No request waiting for a slot: the batch ends with its slowest sequences, and only
        # drafts that move them count (governor.critical_rows).
        crit = None
        left: dict[int, int] = {}
        if self.governor.enabled:
            left = dict(zip(active, self._remaining(runner, req_ids, active, num_tokens)))
            c = critical_rows([left[i] for i in active], getattr(scheduler_output, WAITING_ATTR, None))
            crit = dict(zip(active, c)) if c is not None else None
        # Zero-cost context drafts first; those sequences need no layer-skip draft this round.
        # Each is cut where its measured acceptance no longer pays for verifying it.
        looked_up: set[int] = set()
        t_lookup = time.perf_counter()
        if self.cfg.lookup_max > 0:
            found: dict[int, tuple[np.ndarray, int]] = {}
            from_earliest: set[int] = set()  # rows copying their match's earliest occurrence
            acc = self.lookup_acceptance
            for i in active:
                n_i = int(num_tokens[i])
                k = min(self.k, self.max_model_len - n_i)
                latest, earliest = lookup_matches(batch.token_ids_cpu[i, :n_i], self.cfg.lookup_min,
                                                  self.cfg.lookup_max, k, LONG_MATCHES)
                st = self.seqs[req_ids[i]]
                if earliest is not None:
                    st.rivals = (latest[0].copy(), earliest[0].copy())
                    if st.occurrence.use_earliest:
                        from_earliest.add(i)
                chosen = 1 if i in from_earliest else 0
                d, ng = (earliest if chosen else latest)
                if d.size:
                    found[i] = (d, ng)
                    # measured by the next step's tokens, drafted or not
                    st.proposal = (st.rivals[chosen] if earliest is not None else d.copy(), ng)
            free = [i for i in found if i not in pinned]
            if free:
                # For the batch's end a sequence's own record only lowers the table's chances: one
                # pushed up by a few lucky steps picks drafts that then fail (session 18 at 16:
                # verified context tokens accepted 0.53-0.89 times as often as their scaled chances
                # said), and unscaled, the table overrates the sequences behind, the ones drafted
                # for the batch's end, which are behind because their context drafts fail (session
                # 21, AVX-512 host at 8: QA accepted 0.80 of what the table expected, RAG 0.69,
                # Summarization 0.82; both 0.95-0.97x of plain where no context draft made 0.99x).
                chances = [
                    acc.chances(sampling.is_random(i), found[i][1], int(found[i][0].size),
                                self.seqs[req_ids[i]].lookup, None if crit is None else WAVE_MAX_SCALE)
                    for i in free
                ]
                base = len(active) + sum(int(found[i][0].size) for i in found if i in pinned)
                contexts = [float(num_tokens[i]) / 1000.0 for i in free]
                if crit is None:
                    lengths = self.governor.draft_lengths(chances, base, len(active), contexts=contexts)
                else:
                    blocked = any(crit[i] and i not in found for i in active)
                    first = {i: float(c[0]) for i, c in zip(free, chances)}
                    for i in found:
                        if i in pinned:  # drafted in full: the table's chance all the same
                            first[i] = float(acc.chances(sampling.is_random(i), found[i][1], 1)[0])
                    share = dict(zip(active, joint_shares(last_shares([left[i] for i in active]),
                                                          [first.get(i, 0.0) for i in active])))
                    lengths = self.governor.draft_lengths(chances, base, len(active), [crit[i] for i in free], blocked,
                                                          contexts=contexts, shares=[float(share[i]) for i in free])
                for i, c, m in zip(free, chances, lengths):
                    found[i] = (found[i][0][:m], found[i][1])
                    self.seqs[req_ids[i]].lookup_expect = float(c[:m].sum())
            for i, (d, ng) in found.items():
                if d.size:
                    drafts[i] = d.tolist()
                    looked_up.add(i)
                    self.seqs[req_ids[i]].lookup_n = ng
                    self.stats.lookup_earliest += i in from_earliest
            self.stats.lookup_rounds += len(looked_up)
            self.stats.lookup_tokens += sum(len(drafts[i]) for i in looked_up)
        t0 = time.perf_counter()
        plan_s_before = self.stats.plan_s
        skip_rows = [
            i for i in active
            if i not in looked_up and ((use_skip and (crit is None or crit[i])) or i in pinned)
        ]
        if self.governor.probing:
            free_rows = [i for i in skip_rows if i not in pinned]
            skip_rows = [i for i in skip_rows if i in pinned] + free_rows[:1]
        skip_drafted = False
        if skip_rows:
            # [n, KV cache groups, blocks]: read only by layer-skip plans and drafts
            block_table = kv.block_tables(runner, n)
            if self.num_skip > 0 and aux_hidden_states is not None:
                since = {i: self.seqs[req_ids[i]].rounds_since_plan for _, i in due}
                chosen = rows_to_plan(due, set(skip_rows), pinned, left, since, self.fallback_keep is not None, self.cfg.max_plans_per_step)
                for i in chosen:
                    self._plan(req_ids[i], aux_hidden_states, last_idx[i], int(num_tokens[i]) - 2, block_table[i])
            rows, keeps = [], []
            for i in skip_rows:
                keep = self.seqs[req_ids[i]].keep
                if keep is None and i not in pinned:
                    keep = self.fallback_keep
                if keep is None and self.num_skip > 0:
                    continue
                rows.append(i)
                keeps.append(keep if keep is not None else torch.ones(stack.num_layers, dtype=torch.bool))
            if rows:
                self._draft(rows, keeps, batch, num_tokens, block_table, drafts, sampling)
                for i in rows:
                    self.seqs[req_ids[i]].skip_drafted = True
                skip_drafted = True
        skip_s = time.perf_counter() - t0
        sampling.publish(runner, drafts)
        end = time.perf_counter()
        self.stats.draft_s += end - t_lookup - (self.stats.plan_s - plan_s_before)
        arm = SKIP if skip_drafted else LOOKUP if looked_up else PLAIN
        self.governor.finish(arm, skip_s, end - now, end, plan_s=self.stats.plan_s - plan_s_before)
        return drafts

    def needs_hidden_states(self, runner: Any, scheduler_output: Any) -> bool:
        """Will this step's proposal plan? Only then need the verification forward return every
        layer's hidden state (an add and a copy per layer and token, prefills included). Asked
        after vLLM updated the batch, before the forward. Errs towards yes: a missed plan waits
        for a later step, a needless capture costs a little time."""
        batch = runner.input_batch
        scheduled = scheduler_output.num_scheduled_tokens
        skip_possible = self.governor.may_use_skip(len(scheduled)) and self.num_skip > 0
        seeded = bool(batch.generators)
        cap = self.cfg.disable_by_batch_size
        if cap is not None and len(scheduled) > cap:
            return False
        if not skip_possible and not seeded:
            return False
        limit = self.cfg.replan_interval
        for i, rid in enumerate(batch.req_ids):
            n = scheduled.get(rid, 0)
            if n == 0 or batch.num_computed_tokens_cpu[i] + n < batch.num_prompt_tokens[i]:
                continue  # not sampled this step (a prefill chunk that is not the last)
            st = self.seqs.get(rid)
            if st is None or plan_due(st, limit - 1) is not None:  # due after this step
                if skip_possible or i in batch.generators:
                    return True
        return False

    def _remaining(self, runner: Any, req_ids: list[str], rows: list[int], num_tokens: np.ndarray) -> list[int]:
        """Tokens each sequence may still generate (max_tokens, the model's length)."""
        out = []
        for i in rows:
            st = runner.requests.get(req_ids[i])
            sp = getattr(st, "sampling_params", None)
            left = self.max_model_len - int(num_tokens[i])
            if sp is not None and sp.max_tokens is not None and st is not None:
                left = min(left, int(sp.max_tokens) - (int(num_tokens[i]) - int(st.num_prompt_tokens)))
            out.append(left)
        return out

    def _plan(self, rid: str, aux: list[torch.Tensor], tok_idx: int, pos: int, block_row: torch.Tensor) -> None:
        stack, kv = self.stack, self.kv
        assert stack is not None and kv is not None
        t0 = time.perf_counter()
        targets = torch.stack([h[tok_idx] for h in aux], dim=0)
        runner = ScratchLayerRunner(stack, kv, self.vllm_config, pos, block_row)
        skipped = plan_skip_layers(targets, self.num_skip, runner)
        if self.cfg.self_check:
            self._self_check(runner, targets)
        keep = ~skip_mask(skipped, stack.num_layers)
        st = self.seqs[rid]
        st.keep = keep
        st.rounds_since_plan = 0
        st.fit = PlanFit()
        self.fallback_keep = keep
        self.stats.plans += 1
        dt = time.perf_counter() - t0
        self.stats.plan_s += dt
        observe_plan(self.stats, dt)
        self.stats.skipped_hist[len(skipped)] = self.stats.skipped_hist.get(len(skipped), 0) + 1
        logger.debug("clasp plan for %s at position %d: skip layers %s", rid, pos, skipped)

    def _self_check(self, runner: ScratchLayerRunner, targets: torch.Tensor) -> None:
        """Running layer i on x_i in scratch must give x_{i+1}: the scratch K/V path is exact."""
        for i in range(targets.shape[0] - 1):
            out = runner(i, targets[i : i + 1], [0])
            err = (out[0].float() - targets[i + 1].float()).abs().max().item()
            scale = targets[i + 1].float().abs().max().item() + 1e-6
            if err > 1e-3 * scale + 1e-4:
                raise RuntimeError(
                    f"clasp self-check failed at layer {i}: scratch-KV layer output differs from the "
                    f"captured verification state by {err:.3e} (scale {scale:.3e})"
                )

    def _draft(
        self,
        rows: list[int],
        keeps: list[torch.Tensor],
        batch: Any,
        num_tokens: np.ndarray,
        block_table: torch.Tensor,
        drafts: list[list[int]],
        sampling: "_SamplingRows",
    ) -> None:
        stack, kv = self.stack, self.kv
        assert stack is not None and kv is not None
        det = self.cfg.draft_exit_threshold
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        keep = torch.stack(keeps, dim=0)
        n_tok = torch.as_tensor(num_tokens[rows], dtype=torch.long)
        budget = torch.clamp(torch.as_tensor(self.max_model_len, dtype=torch.long) - n_tok, max=self.k)
        tokens = torch.as_tensor(batch.token_ids_cpu[rows, (n_tok - 1).numpy()], dtype=torch.long)
        positions = n_tok - 1
        alive = budget > 0
        bt = block_table[rows_t]
        context_ids = None
        foreign: dict[int, torch.Tensor] = {}  # row -> draft-vocabulary columns from other rows' contexts
        if self.head.enabled:
            ctx = [batch.token_ids_cpu[r, : int(num_tokens[r])] for r in rows]
            u = np.unique(np.concatenate(ctx))
            u = u[u >= self.head.size].astype(np.int64)
            context_ids = torch.from_numpy(u)
            foreign = {r: foreign_context_columns(u, c, self.head.size)
                       for r, c in zip(rows, ctx) if sampling.is_random(r)}
        for step in range(self.k):
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            logits, vocab_ids = draft_step(
                stack, kv, self.vllm_config, tokens[idx], positions[idx], bt[idx], keep[idx],
                self.head, context_ids,
            )
            probs = torch.softmax(logits.float(), dim=-1)
            p_top, tok = probs.max(dim=-1)
            rand = [k for k, a in enumerate(idx.tolist()) if sampling.is_random(rows[a])]
            if rand:
                # Sampled requests draw their draft from q (the draft's own distribution after
                # temperature/top-k/top-p) and hand q to vLLM's rejection sampler.
                rr = [rows[int(idx[k])] for k in rand]
                x = logits[rand]
                for a, r in enumerate(rr):
                    cols = foreign.get(r)
                    if cols is not None and cols.numel() and vocab_ids is not None:
                        x[a, cols] = float("-inf")
                q = sampling.draft_distributions(rr, x)
                t = sampling.sample(rr, [len(drafts[r]) for r in rr], q)
                for a, (k, r) in enumerate(zip(rand, rr)):
                    sampling.record(r, len(drafts[r]), q[a], vocab_ids)
                rand_t = torch.as_tensor(rand)
                tok[rand_t] = t
                p_top[rand_t] = q.gather(1, t.unsqueeze(1)).squeeze(1)
            if vocab_ids is not None:
                tok = vocab_ids[tok]
            self.stats.draft_steps += 1
            self.stats.draft_rows += int(idx.numel())
            self.stats.layers_run += int(keep[idx].sum())
            ok = p_top >= det
            keep_tok = ok | (p_top >= self.cfg.draft_keep_threshold)
            for a, b, good, kept in zip(idx.tolist(), tok.tolist(), ok.tolist(), keep_tok.tolist()):
                if kept:
                    drafts[rows[a]].append(b)
                if not good:
                    self.stats.exits += 1
            self.stats.draft_tokens += int(keep_tok.sum())
            tokens[idx] = tok
            positions[idx] += 1
            still = ok & (torch.as_tensor([len(drafts[rows[a]]) for a in idx.tolist()]) < budget[idx])
            alive[idx] = still


class _SamplingRows:
    """Per-request sampling settings for this step, and the draft distributions q of sampled
    requests' drafts, published to the runner for vLLM's rejection sampler."""

    def __init__(self, params: dict[int, Any], num_tokens: np.ndarray, k: int, req_ids: list[str], use_q: bool):
        self.params = params  # batch row -> SamplingParams of random (temperature > 0) requests
        self.use_q = use_q
        self.num_tokens = num_tokens
        self.k = k
        self.req_ids = req_ids
        self.q: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def from_runner(cls, runner: Any, req_ids: list[str], num_tokens: np.ndarray, k: int, use_q: bool) -> "_SamplingRows":
        params = {}
        for i, rid in enumerate(req_ids):
            st = runner.requests.get(rid)
            sp = getattr(st, "sampling_params", None)
            if sp is not None and sp.temperature is not None and sp.temperature > 1e-5:
                params[i] = sp
        return cls(params, num_tokens, k, req_ids, use_q)

    def is_random(self, row: int) -> bool:
        """Draft this row from q (else: argmax, a point mass)."""
        return self.use_q and row in self.params

    def is_seeded(self, row: int) -> bool:
        sp = self.params.get(row)
        return sp is not None and sp.seed is not None

    def draft_distributions(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """q for each row: the draft logits under the row's temperature, top-k and top-p. Any q
        keeps sampling exact (the drafts are drawn from it); closer to the target's, more accepted."""
        sps = [self.params[r] for r in rows]
        x = logits.float() / torch.tensor([float(sp.temperature) for sp in sps]).unsqueeze(1)
        V = x.shape[1]
        k = torch.tensor([sp.top_k if sp.top_k is not None and 0 < sp.top_k < V else V for sp in sps])
        if bool((k < V).any()):
            kth = torch.sort(x, dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            x = x.masked_fill(x < kth, float("-inf"))
        q = torch.softmax(x, dim=1)
        p = torch.tensor([sp.top_p if sp.top_p is not None else 1.0 for sp in sps], dtype=q.dtype)
        if bool((p < 1.0).any()):
            sq, order = torch.sort(q, dim=1, descending=True)
            sq = sq.masked_fill((sq.cumsum(1) - sq) > p.unsqueeze(1), 0.0)
            q = torch.zeros_like(q).scatter_(1, order, sq)
            q = q / q.sum(dim=1, keepdim=True)
        return q

    def sample(self, rows: list[int], js: list[int], q: torch.Tensor) -> torch.Tensor:
        """One draft per row from q; seeded requests from their own generator (reproducible)."""
        out = torch.empty(len(rows), dtype=torch.long)
        free = [a for a, r in enumerate(rows) if self.params[r].seed is None]
        if free:
            out[free] = torch.multinomial(q[free], 1).squeeze(1)
        for a, (r, j) in enumerate(zip(rows, js)):
            g = self.generator(r, j)
            if g is not None:
                out[a] = torch.multinomial(q[a], 1, generator=g).item()
        return out

    def generator(self, row: int, j: int) -> torch.Generator | None:
        sp = self.params[row]
        if sp.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed((int(sp.seed) * 1_000_003 + int(self.num_tokens[row]) * 131 + j) % (2**63))
        return g

    def record(self, row: int, j: int, q: torch.Tensor, vocab_ids: torch.Tensor | None) -> None:
        self.q[(row, j)] = (q, vocab_ids)

    def publish(self, runner: Any, drafts: list[list[int]]) -> None:
        """Give vLLM's rejection sampler q ([rows with drafts, K, V]) when some draft was drawn
        from one. Other drafts (argmax, context) are point masses: with no probabilities at all
        vLLM treats every draft so, which is exact and needs no dense tensor."""
        if not self.q:
            return
        vocab = int(runner.model_config.get_vocab_size())
        with_drafts = [r for r, d in enumerate(drafts) if d]
        probs = torch.zeros(len(with_drafts), self.k, vocab, dtype=torch.float32)
        for a, r in enumerate(with_drafts):
            for j, t in enumerate(drafts[r]):
                rec = self.q.get((r, j))
                if rec is None:
                    probs[a, j, t] = 1.0
                else:
                    q, ids = rec
                    if ids is None:
                        probs[a, j, : q.shape[0]] = q
                    else:
                        probs[a, j].index_copy_(0, ids, q)
        runner._draft_probs = probs
        runner._draft_prob_req_ids = [self.req_ids[r] for r in with_drafts]
