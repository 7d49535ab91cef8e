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
from peer.shapes import (  # noqa: F401 (the arithmetic needs no torch: peer.sim imports it from there)
    PARTITIONS, _costs, balanced_ranges, layer_ranges, stage_costs, stage_layer_ranges,
)

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
