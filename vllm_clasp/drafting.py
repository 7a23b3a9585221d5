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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata


class UnsupportedModelError(RuntimeError):
    pass


class LayerStack:
    """The parts of a vLLM decoder-only model CLaSp uses: embedding, layers, final norm, head.

    Llama, Mistral and Qwen2/3 in vLLM share this shape; other families get an adapter here.
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

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(token_ids)

    def run_layer(self, i: int, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Raw residual stream in, raw residual stream out (the layer's (out, residual) summed)."""
        h, r = self.layers[i](positions, x, None)
        return h + r

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.inner.norm(x))

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


class DraftHead:
    """The draft's LM head over part of the vocabulary: the ``size`` lowest token ids (BPE
    vocabularies put frequent tokens first) plus every token in the drafting sequences' contexts.

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
        h = self.stack.inner.norm(x)
        extra = None
        if context_ids is not None:
            extra = context_ids[context_ids >= self.size]
        if extra is None or extra.numel() == 0:
            return h @ self.w_static.T, None
        logits = torch.cat([h @ self.w_static.T, h @ self.w[extra].T], dim=1)
        ids = torch.cat([torch.arange(self.size, dtype=extra.dtype), extra])
        return logits, ids


@dataclass
class KVGroup:
    """Attention plumbing for the (single) KV cache group the decoder layers live in."""

    builder: Any
    block_size: int
    kv_caches: dict[str, torch.Tensor]
    scratch_block_ids: list[int]


def kv_group_from_runner(runner: Any, stack: LayerStack, num_scratch: int) -> KVGroup:
    groups = [g for gl in runner.attn_groups for g in gl]
    names = set(stack.attn_names)
    owning = [g for g in groups if names & set(g.layer_names)]
    if len(owning) != 1 or not names <= set(owning[0].layer_names):
        raise UnsupportedModelError(
            "clasp needs all decoder attention layers in one KV cache/attention group "
            f"(found {len(owning)} groups)"
        )
    group = owning[0]
    if getattr(group, "kernel_block_size", None) is not None:
        raise UnsupportedModelError("clasp does not support kernel blocks smaller than KV cache blocks")
    ctx = runner.compilation_config.static_forward_context
    kv_caches = {n: ctx[n].kv_cache for n in stack.attn_names}
    first = kv_caches[stack.attn_names[0]]
    if isinstance(first, (list, tuple)):
        kv_caches = {n: c[0] for n, c in kv_caches.items()}
        first = kv_caches[stack.attn_names[0]]
    block_size = group.kv_cache_spec.block_size
    num_blocks = first.shape[0]
    scratch = list(range(num_blocks - num_scratch, num_blocks))
    return KVGroup(group.get_metadata_builder(), block_size, kv_caches, scratch)


def build_decode_metadata(
    kv: KVGroup, seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor
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
    return kv.builder.build(0, cam, fast_build=True)


def slots_for(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    blk = block_table.gather(1, (positions // block_size).long().unsqueeze(1)).squeeze(1).long()
    return blk * block_size + (positions % block_size).long()


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

    keep: [n, L] bool, which layers each row runs. Rows sharing a layer subset share metadata.
    """
    n = int(token_ids.shape[0])
    seq_lens = (positions + 1).to(torch.int32)
    slots = slots_for(block_table, positions, kv.block_size)
    x = stack.embed(token_ids)
    all_rows = keep.all(dim=0)
    any_rows = keep.any(dim=0)
    md_cache: dict[bytes, tuple[Any, torch.Tensor | None]] = {}
    md_by_layer: dict[str, Any] = {}
    slots_by_layer: dict[str, torch.Tensor] = {}
    rows_by_layer: list[torch.Tensor | None] = []
    for i in range(stack.num_layers):
        if not bool(any_rows[i]):
            rows_by_layer.append(None)
            continue
        if bool(all_rows[i]):
            key = b"all"
            rows = None
        else:
            col = keep[:, i]
            key = col.numpy().tobytes()
            rows = col.nonzero().squeeze(1)
        if key not in md_cache:
            if rows is None:
                md = build_decode_metadata(kv, seq_lens, block_table, slots)
                md_cache[key] = (md, slots)
            else:
                md = build_decode_metadata(kv, seq_lens[rows], block_table[rows], slots[rows])
                md_cache[key] = (md, slots[rows])
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
    ``pos``, so it sees the earlier positions of that block too) and reads the rest of the
    sequence's blocks from the real cache. Nothing outside the scratch blocks is written.
    """

    def __init__(self, stack: LayerStack, kv: KVGroup, vllm_config: Any, pos: int, block_row: torch.Tensor):
        self.stack, self.kv, self.vllm_config = stack, kv, vllm_config
        self.pos = int(pos)
        self.block_row = block_row
        bs = kv.block_size
        self.col = self.pos // bs
        self.offset = self.pos % bs
        self.tail_block = int(block_row[self.col])
        self._md: dict[int, tuple[Any, torch.Tensor]] = {}

    def _metadata(self, r: int) -> tuple[Any, torch.Tensor]:
        if r not in self._md:
            if r > len(self.kv.scratch_block_ids):
                raise RuntimeError(f"planner needs {r} scratch blocks, {len(self.kv.scratch_block_ids)} reserved")
            scratch = torch.tensor(self.kv.scratch_block_ids[:r], dtype=self.block_row.dtype)
            bt = self.block_row.unsqueeze(0).repeat(r, 1)
            bt[:, self.col] = scratch
            slots = scratch.long() * self.kv.block_size + self.offset
            seq_lens = torch.full((r,), self.pos + 1, dtype=torch.int32)
            self._md[r] = (build_decode_metadata(self.kv, seq_lens, bt, slots), slots)
        return self._md[r]

    def __call__(self, i: int, states: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        r = int(states.shape[0])
        md, slots = self._metadata(r)
        name = self.stack.attn_names[i]
        if self.offset > 0:
            cache = self.kv.kv_caches[name]
            ids = self.kv.scratch_block_ids[:r]
            cache[ids[0] : ids[0] + r] = cache[self.tail_block].unsqueeze(0)
        positions = torch.full((r,), self.pos, dtype=torch.int64)
        with set_forward_context({name: md}, self.vllm_config, num_tokens=r, slot_mapping={name: slots}):
            return self.stack.run_layer(i, positions, states)
