"""Model presets, built from config with HF ``transformers`` and randomly initialised.

Embeddings and LM head are untied in every preset, so that pipeline stages own
disjoint parameters (stage 0 the embeddings, the last stage the head); the single-
process baseline trains exactly the same model. Dropout is 0, as in nanoGPT.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: str  # "llama" or "gpt2"
    hidden: int
    intermediate: int
    heads: int
    layers: int
    max_positions: int


PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("llama", hidden=64, intermediate=256, heads=4, layers=4, max_positions=512),
    "llama-14m": ModelSpec("llama", hidden=128, intermediate=512, heads=4, layers=6, max_positions=2048),
    "gpt2-124m": ModelSpec("gpt2", hidden=768, intermediate=3072, heads=12, layers=12, max_positions=1024),
    # a width sweep (the battle test's square-cube scenario): compute per token grows with hidden^2, the
    # activations a stage sends with hidden; 4 layers, head dim 32
    "llama-h128": ModelSpec("llama", hidden=128, intermediate=512, heads=4, layers=4, max_positions=512),
    "llama-h256": ModelSpec("llama", hidden=256, intermediate=1024, heads=8, layers=4, max_positions=512),
    "llama-h512": ModelSpec("llama", hidden=512, intermediate=2048, heads=16, layers=4, max_positions=512),
    "llama-h1024": ModelSpec("llama", hidden=1024, intermediate=4096, heads=32, layers=4, max_positions=512),
}


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


def flops_per_token(preset: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:
    6 * parameters in matmuls + 12 * layers * hidden * seq_len for attention scores."""
    spec = PRESETS[preset]
    h, i, n = spec.hidden, spec.intermediate, spec.layers
    mlp = (3 if spec.arch == "llama" else 2) * h * i
    matmul_params = n * (4 * h * h + mlp) + vocab_size * h  # the LM head; embeddings are lookups
    return 6.0 * matmul_params + 12.0 * n * h * seq_len
