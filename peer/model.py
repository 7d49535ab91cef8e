"""Model presets, built from config with HF ``transformers`` and randomly initialised.

Embeddings and LM head are untied in every preset, so that pipeline stages own
disjoint parameters (stage 0 the embeddings, the last stage the head); the single-
process baseline trains exactly the same model. Dropout is 0, as in nanoGPT.
"""

from __future__ import annotations

import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from peer.shapes import PRESETS, ModelSpec, flops_per_token  # noqa: F401 (presets live where torch is not needed)

logger = logging.getLogger(__name__)


def hf_config(preset: str, vocab_size: int, seq_len: int):
    """The ``transformers`` config of a preset for a tokenizer's vocabulary and a sequence length."""
    spec = PRESETS[preset]
    positions = max(spec.max_positions, seq_len)
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            num_hidden_layers=spec.layers,
            max_position_embeddings=positions,
            tie_word_embeddings=False,
            attention_dropout=0.0,
            use_cache=False,
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=spec.hidden,
        n_inner=spec.intermediate,
        n_head=spec.heads,
        n_layer=spec.layers,
        n_positions=positions,
        tie_word_embeddings=False,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
    )


def build_model(preset: str, vocab_size: int, seq_len: int, seed: int) -> PreTrainedModel:
    """The full causal LM of a preset, initialised from ``seed`` (same seed, same weights)."""
    config = hf_config(preset, vocab_size, seq_len)
    with torch.random.fork_rng(devices=[]):  # building a model leaves the caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config) if PRESETS[preset].arch == "llama" else GPT2LMHeadModel(config)
    return model


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
