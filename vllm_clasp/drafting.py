"""Skip-layer forward passes on the target's own weights and paged KV cache.

Two kinds of forward run here, both eager and outside vLLM's compiled model (only
``Model.forward`` is compiled; the decoder layers are plain modules we can call one by one):

* draft steps: one token per drafting sequence; layer i runs only on the rows of sequences that
  keep it (a gather/scatter), and writes its K/V into the target's cache slots for that position,
  which the next verification overwrites;
* planner steps: the DP's candidate rows for one sequence, all at the same position; each row
  attends to the cached full-model K/V of earlier positions plus only its own K/V, written into a
  scratch copy of the sequence's last block (scratch blocks are reserved from the KV pool at
  start-up and never handed to the scheduler).

Attention metadata comes from vLLM's own metadata builders (``CommonAttentionMetadata`` ->
backend metadata), so the kernels see exactly what they see in a target step.

Model families plug in through a small ``LayerStack`` adapter (Llama-style default, Gemma 3);
hybrid-attention models, whose layers sit in several KV cache groups, through ``KVGroup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata


class UnsupportedModelError(RuntimeError):
    pass


class LayerStack:
    """Adapter: the parts of a vLLM decoder-only model CLaSp uses (embedding, layers, final norm,
    head) and how to make its forward return every layer's hidden state.

    This default fits models whose decoder layer is ``layer(positions, x, residual) -> (out,
    residual)`` with the raw residual stream ``out + residual`` and ``compute_logits(norm(x))``
    as the head, and that implement vLLM's EAGLE-3 aux hidden-state outputs: Llama, Mistral,
    Qwen2/3. Families that differ get a subclass in ``ADAPTERS``.
    """

    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        needed = ("layers", "embed_input_ids", "norm")
        if inner is None or not all(hasattr(inner, a) for a in needed):
            raise UnsupportedModelError(
                f"clasp cannot drive {type(model).__name__}: it needs model.model.layers, "
                "model.model.embed_input_ids and model.model.norm"
            )
        if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(inner.layers)) != len(
            inner.layers
        ):
            raise UnsupportedModelError("clasp needs every decoder layer on this rank (no pipeline stages)")
        self.model = model
        self.inner = inner
        self.layers = list(inner.layers)
        self.num_layers = len(self.layers)
        self.attn_names = []
        for i, layer in enumerate(self.layers):
            attn = getattr(getattr(layer, "self_attn", None), "attn", None)
            name = getattr(attn, "layer_name", None)
            if name is None:
                raise UnsupportedModelError(f"decoder layer {i} has no self_attn.attn.layer_name")
            self.attn_names.append(name)

    def capture_all_layers(self, on: bool = True) -> None:
        """Make the model's forward also return x_0..x_L (aux hidden states), or stop it."""
        from vllm.model_executor.models.interfaces import supports_eagle3

        if not supports_eagle3(self.model):
            raise UnsupportedModelError(
                f"clasp needs per-layer hidden states, which {type(self.model).__name__} cannot "
                "return (it does not implement vLLM's SupportsEagle3 interface)"
            )
        self.model.set_aux_hidden_state_layers(tuple(range(self.num_layers + 1)) if on else ())

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(token_ids)

    def run_layer(self, i: int, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Raw residual stream in, raw residual stream out (the layer's (out, residual) summed)."""
        h, r = self.layers[i](positions, x, None)
        return h + r

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.norm(x))

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's [V, H] weight when logits are a plain matmul with it (else None)."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        head = getattr(self.model, "lm_head", None)
        lp = getattr(self.model, "logits_processor", None)
        w = getattr(head, "weight", None)
        if w is None or lp is None or get_tensor_model_parallel_world_size() != 1:
            return None
        if getattr(lp, "soft_cap", None) is not None or getattr(lp, "scale", 1.0) != 1.0:
            return None
        if getattr(head, "bias", None) is not None:
            return None
        return w


class Gemma3Stack(LayerStack):
    """Gemma 3 (text). The rest of the Llama contract holds as is:

    * ``embed_input_ids`` already multiplies by sqrt(hidden_size), so x_0 is the scaled embedding;
    * the extra norms (q/k norms, post-attention, pre/post-feed-forward) sit inside the decoder
      layer, which still returns ``(out, residual)`` with x_{i+1} = out + residual;
    * the head is tied to the embedding; a final logit soft-cap (Gemma 2's, None in Gemma 3)
      makes ``head_weight`` return None, so the draft then uses the full ``compute_logits``;
    * sliding-window and global layers sit in different KV cache groups: ``KVGroup`` handles that.

    vLLM 0.32's Gemma3Model has no EAGLE-3 aux outputs; ``patches.Gemma3AllLayerHiddenStates``
    adds them, switched on by the ``clasp_aux_layers`` attribute set here.
    """

    def capture_all_layers(self, on: bool = True) -> None:
        from vllm_clasp.patches import Gemma3AllLayerHiddenStates

        if not Gemma3AllLayerHiddenStates.applied():
            raise UnsupportedModelError("clasp on Gemma 3 needs the Gemma3AllLayerHiddenStates patch")
        self.inner.clasp_aux_layers = tuple(range(self.num_layers + 1)) if on else ()


ADAPTERS: dict[str, type[LayerStack]] = {"Gemma3ForCausalLM": Gemma3Stack}


def layer_stack(model: nn.Module) -> LayerStack:
    """The adapter for ``model``'s class (Llama-style by default)."""
    return ADAPTERS.get(type(model).__name__, LayerStack)(model)


class DraftHead:
    """The draft's LM head over part of the vocabulary: the ``size`` lowest token ids (BPE
    vocabularies put frequent tokens first) plus every token in the drafting sequences' contexts
    (a sampled row's q leaves out the other rows' ones: ``foreign_context_columns``).

    The full head is 12-14 % of a step on small models; a draft needs only a likely argmax and a
    confidence. Verification still uses the full vocabulary, so output is unchanged.
    """

    def __init__(self, stack: LayerStack, size: int):
        self.stack = stack
        w = stack.head_weight() if size > 0 else None
        self.enabled = w is not None and size < w.shape[0]
        if self.enabled:
            assert w is not None
            self.vocab = int(w.shape[0])
            self.size = int(size)
            self.w_static = w[: self.size]  # a view: no copy of weights
            self.w = w

    def logits(self, x: torch.Tensor, context_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits over the draft vocabulary, its token ids; None means the full vocabulary)."""
        if not self.enabled:
            return self.stack.logits(x), None
        h = self.stack.norm(x)
        extra = None
        if context_ids is not None:
            extra = context_ids[context_ids >= self.size]
        if extra is None or extra.numel() == 0:
            return h @ self.w_static.T, None
        logits = torch.cat([h @ self.w_static.T, h @ self.w[extra].T], dim=1)
        ids = torch.cat([torch.arange(self.size, dtype=extra.dtype), extra])
        return logits, ids


def foreign_context_columns(context_ids: np.ndarray, own: np.ndarray, size: int) -> torch.Tensor:
    """Columns of ``DraftHead.logits`` (``size`` static ones, then ``context_ids``) that hold
    tokens found only in other rows' contexts. A sampled row drafts with these masked: its q, and
    so its seeded random stream's outcome, must not depend on which requests draft beside it."""
    return torch.from_numpy(size + np.flatnonzero(~np.isin(context_ids, own))).long()


@dataclass
class KVGroup:
    """Attention plumbing for the decoder layers: one entry per vLLM KV cache group they use.

    Models with one kind of attention have one group. Hybrid models (Gemma 3: sliding-window and
    global layers) have several, each with its own block table and metadata builder; block ids
    come from one shared pool, so the scratch blocks at its end serve every group.
    """

    group_ids: list[int]  # vLLM KV cache group id of each entry
    builders: list[Any]
    block_sizes: list[int]
    layer_group: list[int]  # entry index for each decoder layer
    kv_caches: dict[str, torch.Tensor]
    scratch_block_ids: list[int]

    def block_tables(self, runner: Any, n: int) -> torch.Tensor:
        """[n, groups, max_blocks]: the block table rows of the first n requests, per group."""
        tables = [runner.input_batch.block_table[g].get_device_tensor(n)[:n] for g in self.group_ids]
        width = max(t.shape[1] for t in tables)
        tables = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables]
        return torch.stack(tables, dim=1)


def kv_group_from_runner(runner: Any, stack: LayerStack, num_scratch: int) -> KVGroup:
    names = set(stack.attn_names)
    owners: dict[str, tuple[int, Any]] = {}
    for gid, group_list in enumerate(runner.attn_groups):
        for g in group_list:
            for name in names & set(g.layer_names):
                if name in owners:
                    raise UnsupportedModelError(f"attention layer {name} is in more than one attention group")
                owners[name] = (getattr(g, "kv_cache_group_id", gid), g)
    missing = names - set(owners)
    if missing:
        raise UnsupportedModelError(f"clasp found no KV cache group for attention layers {sorted(missing)}")
    group_ids: list[int] = []
    groups: list[Any] = []
    layer_group: list[int] = []
    for name in stack.attn_names:
        gid, g = owners[name]
        if g not in groups:
            if getattr(g, "kernel_block_size", None) is not None:
                raise UnsupportedModelError("clasp does not support kernel blocks smaller than KV cache blocks")
            groups.append(g)
            group_ids.append(gid)
        layer_group.append(groups.index(g))
    if len(set(group_ids)) != len(group_ids):
        raise UnsupportedModelError("clasp needs one attention backend per KV cache group")
    ctx = runner.compilation_config.static_forward_context
    kv_caches = {n: ctx[n].kv_cache for n in stack.attn_names}
    first = kv_caches[stack.attn_names[0]]
    if isinstance(first, (list, tuple)):
        kv_caches = {n: c[0] for n, c in kv_caches.items()}
    num_blocks = min(int(c.shape[0]) for c in kv_caches.values())
    scratch = list(range(num_blocks - num_scratch, num_blocks))
    return KVGroup(
        group_ids,
        [g.get_metadata_builder() for g in groups],
        [int(g.kv_cache_spec.block_size) for g in groups],
        layer_group,
        kv_caches,
        scratch,
    )


def build_decode_metadata(
    builder: Any, seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor
) -> Any:
    """Backend metadata for ``n`` one-token queries (a decode batch)."""
    n = int(seq_lens.shape[0])
    qsl = torch.arange(n + 1, dtype=torch.int32)
    cam = CommonAttentionMetadata(
        query_start_loc=qsl.to(block_table.device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens.to(torch.int32),
        num_reqs=n,
        num_actual_tokens=n,
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table.to(torch.int32).contiguous(),
        slot_mapping=slots.to(torch.int64),
        causal=True,
    )
    return builder.build(0, cam, fast_build=True)


def slots_for(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    blk = block_table.gather(1, (positions // block_size).long().unsqueeze(1)).squeeze(1).long()
    return blk * block_size + (positions % block_size).long()


def _per_group(kv: KVGroup, block_table: torch.Tensor) -> torch.Tensor:
    """[n, groups, max_blocks]; a 2-D table (one group's rows) serves every group."""
    if block_table.dim() == 2:
        return block_table.unsqueeze(1).expand(-1, len(kv.group_ids), -1)
    return block_table


def draft_step(
    stack: LayerStack,
    kv: KVGroup,
    vllm_config: Any,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    keep: torch.Tensor,
    head: "DraftHead | None" = None,
    context_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft token for each row: (logits [n, V'], token ids of the V' columns or None = all).

    block_table: [n, groups, max_blocks] (see ``KVGroup.block_tables``).
    keep: [n, L] bool, which layers each row runs. Rows sharing a layer subset and KV cache
    group share metadata.
    """
    n = int(token_ids.shape[0])
    block_table = _per_group(kv, block_table)
    seq_lens = (positions + 1).to(torch.int32)
    slots = [slots_for(block_table[:, g], positions, bs) for g, bs in enumerate(kv.block_sizes)]
    x = stack.embed(token_ids)
    all_rows = keep.all(dim=0)
    any_rows = keep.any(dim=0)
    md_cache: dict[tuple[int, bytes], tuple[Any, torch.Tensor]] = {}
    md_by_layer: dict[str, Any] = {}
    slots_by_layer: dict[str, torch.Tensor] = {}
    rows_by_layer: list[torch.Tensor | None] = []
    for i in range(stack.num_layers):
        if not bool(any_rows[i]):
            rows_by_layer.append(None)
            continue
        g = kv.layer_group[i]
        if bool(all_rows[i]):
            key = (g, b"all")
            rows = None
        else:
            col = keep[:, i]
            key = (g, col.numpy().tobytes())
            rows = col.nonzero().squeeze(1)
        if key not in md_cache:
            bt, sl = block_table[:, g], slots[g]
            if rows is None:
                md_cache[key] = (build_decode_metadata(kv.builders[g], seq_lens, bt, sl), sl)
            else:
                md = build_decode_metadata(kv.builders[g], seq_lens[rows], bt[rows], sl[rows])
                md_cache[key] = (md, sl[rows])
        md, sl = md_cache[key]
        name = stack.attn_names[i]
        md_by_layer[name] = md
        slots_by_layer[name] = sl
        rows_by_layer.append(rows if rows is not None else torch.empty(0, dtype=torch.long))
    with set_forward_context(md_by_layer, vllm_config, num_tokens=n, slot_mapping=slots_by_layer):
        for i, rows in enumerate(rows_by_layer):
            if rows is None:
                continue
            if rows.numel() == 0:  # every row keeps layer i
                x = stack.run_layer(i, positions, x)
            else:
                x = x.clone()
                x[rows] = stack.run_layer(i, positions[rows], x[rows])
    if head is None:
        return stack.logits(x), None
    return head.logits(x, context_ids)


class ScratchLayerRunner:
    """``run_layer`` for the planner: candidate rows of one token at position ``pos``.

    Row k of a call writes its K/V into scratch block k (a copy of the sequence's block holding
    ``pos`` in the layer's KV cache group, so it sees the earlier positions of that block too)
    and reads the rest of the sequence's blocks from the real cache. Nothing outside the scratch
    blocks is written.
    """

    def __init__(self, stack: LayerStack, kv: KVGroup, vllm_config: Any, pos: int, block_row: torch.Tensor):
        self.stack, self.kv, self.vllm_config = stack, kv, vllm_config
        self.pos = int(pos)
        # [groups, max_blocks]; a 1-D row (one group's) serves every group
        self.block_rows = _per_group(kv, block_row.unsqueeze(0))[0] if block_row.dim() == 1 else block_row
        self._md: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}

    def _metadata(self, r: int, g: int) -> tuple[Any, torch.Tensor]:
        if (r, g) not in self._md:
            if r > len(self.kv.scratch_block_ids):
                raise RuntimeError(f"planner needs {r} scratch blocks, {len(self.kv.scratch_block_ids)} reserved")
            bs, row = self.kv.block_sizes[g], self.block_rows[g]
            scratch = torch.tensor(self.kv.scratch_block_ids[:r], dtype=row.dtype)
            bt = row.unsqueeze(0).repeat(r, 1)
            bt[:, self.pos // bs] = scratch
            slots = scratch.long() * bs + self.pos % bs
            seq_lens = torch.full((r,), self.pos + 1, dtype=torch.int32)
            self._md[(r, g)] = (build_decode_metadata(self.kv.builders[g], seq_lens, bt, slots), slots)
        return self._md[(r, g)]

    def __call__(self, i: int, states: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        r = int(states.shape[0])
        g = self.kv.layer_group[i]
        md, slots = self._metadata(r, g)
        name = self.stack.attn_names[i]
        bs = self.kv.block_sizes[g]
        if self.pos % bs > 0:
            cache = self.kv.kv_caches[name]
            ids = self.kv.scratch_block_ids[:r]
            tail = int(self.block_rows[g, self.pos // bs])
            cache[ids[0] : ids[0] + r] = cache[tail].unsqueeze(0)
        positions = torch.full((r,), self.pos, dtype=torch.int64)
        with set_forward_context({name: md}, self.vllm_config, num_tokens=r, slot_mapping={name: slots}):
            return self.stack.run_layer(i, positions, states)
