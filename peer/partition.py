"""Cut a causal LM into pipeline stages.

Stage 0 owns the embeddings, the last stage owns the final norm, the LM head and the
loss. ``even`` (the default) spreads decoder layers as evenly as possible (earlier stages
take the remainder, because the last one also carries the head); ``balanced`` spreads the
estimated compute instead, counting the LM head (and the loss over the vocabulary) as the
layers it costs, so that no stage is the pipeline's bottleneck by construction. A stage keeps the full
model's parameter names (``model.layers.3.mlp.up_proj.weight``), so the state dicts
of all stages together are exactly the full model's state dict, and a stage
checkpoint can be compared with, or merged into, the full model.

A stage's forward takes token ids (stage 0) or the previous stage's hidden states
and returns hidden states, or logits for the last stage; :func:`lm_loss` turns
logits into the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from peer.model import PRESETS, build_model

PARTITIONS = ("even", "balanced")


def layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Decoder layer indices of each stage: ``layer_ranges(6, 4) -> [0:2], [2:4], [4:5], [5:6]``."""
    if not 1 <= num_stages <= max(num_layers, 1):
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages (need 1 <= stages <= layers)")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for k in range(num_stages):
        size = base + (1 if k < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def balanced_ranges(num_layers: int, num_stages: int, layer_cost: float, head_cost: float) -> list[range]:
    """Contiguous layer ranges (at least one layer each) minimising the costliest stage, the last
    stage paying ``head_cost`` on top of its layers."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages (need 1 <= stages <= layers)")
    inf = float("inf")
    # best[k][i]: the smallest possible max stage cost when stages 0..k-1 hold layers 0..i-1
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        extra = head_cost if k == num_stages else 0.0
        for i in range(k, num_layers + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], (i - j) * layer_cost + extra)
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, end = [], num_layers
    for k in range(num_stages, 0, -1):
        start = cut[k][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


def stage_layer_ranges(preset: str, vocab_size: int, seq_len: int, num_stages: int,
                       partition: str = "even") -> list[range]:
    """The decoder layers of each stage of a preset under a partition scheme (see the module docstring)."""
    spec = PRESETS[preset]
    if partition == "even":
        return layer_ranges(spec.layers, num_stages)
    if partition != "balanced":
        raise ValueError(f"unknown partition {partition!r}; use one of {', '.join(PARTITIONS)}")
    layer, head = _costs(preset, vocab_size, seq_len)
    return balanced_ranges(spec.layers, num_stages, layer, head)


def _costs(preset: str, vocab_size: int, seq_len: int) -> tuple[float, float]:
    """Estimated multiply-adds per token of one decoder layer and of the LM head (with its loss)."""
    spec = PRESETS[preset]
    h, i = spec.hidden, spec.intermediate
    layer = (4 * h * h + (3 if spec.arch == "llama" else 2) * h * i) + 2 * seq_len * h  # matmuls + attention
    head = vocab_size * h + 3 * vocab_size  # the LM head and the softmax/cross-entropy over the vocabulary
    return layer, head


def stage_costs(preset: str, vocab_size: int, seq_len: int, num_stages: int, partition: str = "even") -> list[float]:
    """Estimated compute per token of each stage under a partition: its layers, plus the head on the last
    (the embedding lookup is free by comparison). Ratios of these scale a peer's throughput from one stage
    to another (``peer.swarm.rebalancing``)."""
    layer, head = _costs(preset, vocab_size, seq_len)
    ranges = stage_layer_ranges(preset, vocab_size, seq_len, num_stages, partition)
    return [len(r) * layer + (head if k == num_stages - 1 else 0.0) for k, r in enumerate(ranges)]


class StageModule(nn.Module):
    """One pipeline stage of a Llama or GPT-2 causal LM, with the full model's parameter names."""

    def __init__(self, full: PreTrainedModel, stage: int, num_stages: int, ranges: list[range] | None = None):
        """:param ranges: decoder layers of every stage (default: :func:`layer_ranges`, the even split)"""
        super().__init__()
        self.config = full.config
        self.arch = "llama" if full.config.model_type == "llama" else "gpt2"
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        ranges = ranges or layer_ranges(full.config.num_hidden_layers, num_stages)
        self.layer_ids = list(ranges[stage])

        # A bare container named like the HF base model ("model" / "transformer") keeps the names stable.
        base = full.model if self.arch == "llama" else full.transformer
        body = nn.Module()
        blocks = base.layers if self.arch == "llama" else base.h
        if self.arch == "llama":
            if self.is_first:
                body.embed_tokens = base.embed_tokens
            body.rotary_emb = base.rotary_emb  # no parameters, needed by every layer
            body.layers = nn.ModuleDict({str(i): blocks[i] for i in self.layer_ids})
            if self.is_last:
                body.norm = base.norm
            self.model = body
        else:
            if self.is_first:
                body.wte, body.wpe = base.wte, base.wpe
            body.h = nn.ModuleDict({str(i): blocks[i] for i in self.layer_ids})
            if self.is_last:
                body.ln_f = base.ln_f
            self.transformer = body
        if self.is_last:
            self.lm_head = full.lm_head

    @property
    def body(self) -> nn.Module:
        return self.model if self.arch == "llama" else self.transformer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, T) int64 token ids for stage 0, else (B, T, H) hidden states
        :returns: (B, T, H) hidden states, or (B, T, V) logits from the last stage"""
        body = self.body
        seq = x.shape[1]
        position_ids = torch.arange(seq, device=x.device).unsqueeze(0)  # (1, T)
        if self.arch == "llama":
            h = body.embed_tokens(x) if self.is_first else x  # (B, T, H)
            mask = create_causal_mask(
                config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids
            )
            rope = body.rotary_emb(h, position_ids=position_ids)  # (cos, sin), each (1, T, head_dim)
            for block in body.layers.values():
                h = block(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
            if self.is_last:
                h = self.lm_head(body.norm(h))  # (B, T, V)
            return h
        h = body.wte(x) + body.wpe(position_ids) if self.is_first else x  # (B, T, H)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids
        )
        for block in body.h.values():
            h = block(h, attention_mask=mask, position_ids=position_ids)
        if self.is_last:
            h = self.lm_head(body.ln_f(h))  # (B, T, V)
        return h

    def input_spec(self, microbatch: int, seq_len: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of this stage's input for a micro-batch."""
        if self.is_first:
            return (microbatch, seq_len), torch.long
        return (microbatch, seq_len, self.config.hidden_size), torch.float32


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. :param logits: (B, T, V) :param targets: (B, T) int64"""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def split_model(full: PreTrainedModel, num_stages: int, ranges: list[range] | None = None) -> list[StageModule]:
    """All stages of ``full``, sharing its parameter tensors."""
    return [StageModule(full, k, num_stages, ranges) for k in range(num_stages)]


def build_stage(preset: str, vocab_size: int, seq_len: int, seed: int, stage: int, num_stages: int,
                partition: str = "even") -> StageModule:
    """Stage ``stage`` of ``num_stages`` of a preset, with the weights the full model gets from ``seed``.

    The full model is built and the other stages' parts are dropped, so every peer that
    builds a stage from the same seed gets the same weights as the others and as the baseline.
    """
    layers = PRESETS[preset].layers
    if not 0 <= stage < num_stages <= layers:
        raise ValueError(f"stage {stage} of {num_stages} is invalid for {preset} ({layers} layers)")
    ranges = stage_layer_ranges(preset, vocab_size, seq_len, num_stages, partition)
    return StageModule(build_model(preset, vocab_size, seq_len, seed), stage, num_stages, ranges)
