"""Stage throughput: measured on the real stage, cached on disk per (device, stage config, dtype),
re-measured on ``eval``, overridden by a number."""

import json

import pytest

import torch

from peer.config import load_config
from peer.stage.throughput import CACHE_FILE, LiveThroughput, StageShape, stage_throughput, throughput_for

FAST = dict(warmup=1, min_steps=2, min_seconds=0.05)
CPU = torch.device("cpu")


def shape(stage=0, microbatch=2):
    return StageShape("tiny", vocab_size=512, seq_len=32, stage=stage, num_stages=2, microbatch_size=microbatch)


def test_measure_then_cache_hit_then_eval_remeasures(tmp_path):
    first = stage_throughput("auto", shape(), CPU, "fp32", tmp_path, **FAST)
    assert first.source == "measured" and first.samples_per_s > 0
    cache = json.loads((tmp_path / CACHE_FILE).read_text())
    [(key, entry)] = cache.items()
    assert json.loads(key)["device"].startswith("cpu") and json.loads(key)["dtype"] == "fp32"
    assert entry["samples_per_s"] == first.samples_per_s

    again = stage_throughput("auto", shape(), CPU, "fp32", tmp_path, **FAST)
    assert (again.source, again.samples_per_s) == ("cache", first.samples_per_s)

    fresh = stage_throughput("eval", shape(), CPU, "fp32", tmp_path, **FAST)
    assert fresh.source == "measured"
    updated = json.loads((tmp_path / CACHE_FILE).read_text())[key]
    assert updated["samples_per_s"] == fresh.samples_per_s and updated["measured_at"] >= entry["measured_at"]


def test_cache_is_keyed_by_stage_config_and_dtype(tmp_path):
    stage_throughput("auto", shape(stage=0), CPU, "fp32", tmp_path, **FAST)
    last = stage_throughput("auto", shape(stage=1), CPU, "fp32", tmp_path, **FAST)  # the stage with the LM head
    bf16 = stage_throughput("auto", shape(stage=1), CPU, "bf16", tmp_path, **FAST)
    assert last.source == bf16.source == "measured"
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 3


def test_a_number_overrides_without_measuring(tmp_path):
    cfg = load_config({"preset": "tiny", "throughput": "123.5", "cache_dir": tmp_path, "device": "cpu"})
    result = throughput_for(cfg, stage=1)
    assert (result.samples_per_s, result.source) == (123.5, "override")
    assert not (tmp_path / CACHE_FILE).exists()


def test_a_slowdown_lowers_the_measured_prior_but_not_an_override(tmp_path):
    base = load_config({"preset": "tiny", "cache_dir": tmp_path, "device": "cpu", "seq_len": 32, "vocab_size": 512,
                        "microbatch_size": 2, "batch_size": 2})
    cfg = base.with_defaults({"compute_slowdown": 4.0})
    plain = throughput_for(base, stage=0)
    slowed = throughput_for(cfg, stage=0)  # the cached figure, divided
    assert slowed.samples_per_s == pytest.approx(plain.samples_per_s / 4) and "slowed down 4x" in slowed.source
    fixed = throughput_for(cfg.with_defaults({"throughput": "50"}), stage=0)
    assert (fixed.samples_per_s, fixed.source) == (50.0, "override")


def test_the_live_throughput_is_samples_per_busy_second_averaged():
    live = LiveThroughput(alpha=0.5, min_busy_s=1.0)
    assert live.update(10, 0.5) is None  # half a busy second: no window yet
    assert live.update(40, 2.0) == pytest.approx(20.0)  # 40 samples in 2 busy s
    assert live.update(40, 2.0) == pytest.approx(20.0)  # idle: no new window, no change
    assert live.update(60, 4.0) == pytest.approx(15.0)  # 20 samples in 2 s = 10/s, averaged with 20
