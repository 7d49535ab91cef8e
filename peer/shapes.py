"""Model shapes: the presets, and the arithmetic of cutting one into stages and what each stage costs.

Standard library only, so that what needs the numbers without the model (the rebalancing policy's stage costs, the
simulator in :mod:`peer.sim`) does not import torch and transformers. :mod:`peer.model` builds a preset and
:mod:`peer.partition` cuts the built model; both re-export what is defined here. Every function that takes a preset
name also takes a :class:`ModelSpec` (the simulator's models are not presets one can train).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer."""

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


def spec_of(preset: str | ModelSpec) -> ModelSpec:
    """The spec of a preset name, or the spec itself."""
    return preset if isinstance(preset, ModelSpec) else PRESETS[preset]


def flops_per_token(preset: str | ModelSpec, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:
    6 * parameters in matmuls + 12 * layers * hidden * seq_len for attention scores."""
    spec = spec_of(preset)
    h, i, n = spec.hidden, spec.intermediate, spec.layers
    mlp = (3 if spec.arch == "llama" else 2) * h * i
    matmul_params = n * (4 * h * h + mlp) + vocab_size * h  # the LM head; embeddings are lookups
    return 6.0 * matmul_params + 12.0 * n * h * seq_len


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


def stage_layer_ranges(preset: str | ModelSpec, vocab_size: int, seq_len: int, num_stages: int,
                       partition: str = "even") -> list[range]:
    """The decoder layers of each stage of a preset under a partition scheme (see the module docstring)."""
    spec = spec_of(preset)
    if partition == "even":
        return layer_ranges(spec.layers, num_stages)
    if partition != "balanced":
        raise ValueError(f"unknown partition {partition!r}; use one of {', '.join(PARTITIONS)}")
    layer, head = _costs(preset, vocab_size, seq_len)
    return balanced_ranges(spec.layers, num_stages, layer, head)


def _costs(preset: str | ModelSpec, vocab_size: int, seq_len: int) -> tuple[float, float]:
    """Estimated multiply-adds per token of one decoder layer and of the LM head (with its loss)."""
    spec = spec_of(preset)
    h, i = spec.hidden, spec.intermediate
    layer = (4 * h * h + (3 if spec.arch == "llama" else 2) * h * i) + 2 * seq_len * h  # matmuls + attention
    head = vocab_size * h + 3 * vocab_size  # the LM head and the softmax/cross-entropy over the vocabulary
    return layer, head


def stage_costs(preset: str | ModelSpec, vocab_size: int, seq_len: int, num_stages: int,
                partition: str = "even") -> list[float]:
    """Estimated compute per token of each stage under a partition: its layers, plus the head on the last
    (the embedding lookup is free by comparison). Ratios of these scale a peer's throughput from one stage
    to another (``peer.swarm.rebalancing``)."""
    layer, head = _costs(preset, vocab_size, seq_len)
    ranges = stage_layer_ranges(preset, vocab_size, seq_len, num_stages, partition)
    return [len(r) * layer + (head if k == num_stages - 1 else 0.0) for k, r in enumerate(ranges)]
