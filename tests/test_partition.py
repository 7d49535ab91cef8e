"""Cutting a preset into stages: stacking the stages reproduces the full model exactly."""

import pytest
import torch

from peer.model import PRESETS, build_model, count_parameters, flops_per_token, hf_config
from peer.partition import (
    balanced_ranges, build_stage, layer_ranges, lm_loss, split_model, stage_costs, stage_layer_ranges,
)

VOCAB, SEQ = 512, 32
_models = {}


def full_model(preset):
    if preset not in _models:
        _models[preset] = build_model(preset, VOCAB, SEQ, seed=1)
    return _models[preset]


def test_layer_ranges_are_even_and_cover_all_layers():
    assert layer_ranges(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert layer_ranges(12, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    for layers in range(1, 13):
        for stages in range(1, layers + 1):
            ranges = layer_ranges(layers, stages)
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1
            assert [i for r in ranges for i in r] == list(range(layers))
    with pytest.raises(ValueError, match="cannot cut 4 layers into 5 stages"):
        layer_ranges(4, 5)


def test_balanced_partition_counts_the_head_as_layers():
    # a head worth 3.5 layers: 6 layers over 2 stages -> 5 + (1 + head), max cost 5 instead of 3 + 3.5
    assert balanced_ranges(6, 2, 1.0, 3.5) == [range(0, 5), range(5, 6)]
    assert balanced_ranges(6, 3, 1.0, 0.0) == [range(0, 2), range(2, 4), range(4, 6)]
    assert balanced_ranges(4, 4, 1.0, 100.0) == [range(i, i + 1) for i in range(4)]  # at least one layer each
    ranges = stage_layer_ranges("llama-14m", 8192, 128, 2, "balanced")
    assert [len(r) for r in ranges] == [5, 1]
    assert stage_layer_ranges("llama-14m", 8192, 128, 2, "even") == layer_ranges(6, 2)
    with pytest.raises(ValueError, match="unknown partition"):
        stage_layer_ranges("tiny", 512, 32, 2, "random")


@pytest.mark.parametrize("preset", ["tiny", "llama-14m", "gpt2-124m", "llama-h128"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stacked_stages_reproduce_full_logits_and_loss(preset, num_stages):
    full = full_model(preset)
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    y = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    with torch.no_grad():
        expected = full(x).logits
        for partition in ("even", "balanced"):
            h = x
            ranges = stage_layer_ranges(preset, VOCAB, SEQ, num_stages, partition)
            for stage in split_model(full, num_stages, ranges):
                h = stage(h)
            assert h.shape == (2, SEQ, VOCAB)
            assert torch.equal(h, expected), partition
            assert torch.equal(lm_loss(h, y), lm_loss(expected, y))


@pytest.mark.parametrize("preset", ["llama-14m", "gpt2-124m"])
def test_stage_parameters_partition_the_full_model_with_stable_names(preset):
    full = full_model(preset)
    stages = split_model(full, 3)
    names = [set(s.state_dict()) for s in stages]
    assert set.union(*names) == set(full.state_dict())
    assert sum(len(n) for n in names) == len(full.state_dict())  # disjoint
    assert sum(count_parameters(s) for s in stages) == count_parameters(full)
    embed = "model.embed_tokens.weight" if preset == "llama-14m" else "transformer.wte.weight"
    assert embed in names[0] and "lm_head.weight" in names[-1]
    last_layer = PRESETS[preset].layers - 1
    prefix = "model.layers" if preset == "llama-14m" else "transformer.h"
    assert any(n.startswith(f"{prefix}.{last_layer}.") for n in names[-1])
    assert not any(n.startswith(f"{prefix}.0.") for n in names[-1])


def test_build_stage_gives_every_peer_the_full_models_weights():
    stage = build_stage("llama-14m", VOCAB, SEQ, seed=1, stage=1, num_stages=3)
    full = full_model("llama-14m").state_dict()
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    assert stage.input_spec(4, SEQ) == ((4, SEQ, 128), torch.float32)
    with pytest.raises(ValueError, match="stage 3 of 3"):
        build_stage("tiny", VOCAB, SEQ, seed=1, stage=3, num_stages=3)


def test_same_seed_same_weights_other_seed_other_weights():
    a = build_model("tiny", VOCAB, SEQ, seed=3).state_dict()
    b = build_model("tiny", VOCAB, SEQ, seed=3).state_dict()
    c = build_model("tiny", VOCAB, SEQ, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


WIDTHS = [128, 256, 512, 1024]


def test_width_sweep_presets_grow_compute_with_the_square_of_the_width():
    for h in WIDTHS:
        preset = f"llama-h{h}"
        config = hf_config(preset, VOCAB, SEQ)  # no weights: the widest one is 50M+ parameters
        assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (h, 4 * h, 4)
        assert config.hidden_size // config.num_attention_heads == 32 and PRESETS[preset].max_positions == 512
        assert [len(r) for r in stage_layer_ranges(preset, VOCAB, SEQ, 2, "balanced")] in ([2, 2], [3, 1])
        assert sum(stage_costs(preset, VOCAB, SEQ, 2)) > 0
    flops = [flops_per_token(f"llama-h{h}", VOCAB, SEQ) for h in WIDTHS]
    ratios = [flops[k + 1] / flops[k] for k in range(len(flops) - 1)]
    assert all(3.5 < r <= 4.0 for r in ratios), ratios  # doubling the width: about 4x the compute per token
