"""k micro-batches of size b accumulate to the gradients of one batch of size k*b."""

import numpy as np
import torch

from peer.data import Windows
from peer.partition import build_stage, lm_loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulated_microbatches_match_one_big_batch(corpus):
    windows = Windows(corpus.train, 64)
    x, y = windows.batch(np.arange(100, 108))  # (8, 64) each
    model = build_stage("tiny", corpus.vocab_size, 64, seed=0, stage=0, num_stages=1)

    lm_loss(model(x), y).backward()
    big = grads(model)
    model.zero_grad(set_to_none=True)

    k = 4
    for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
        (lm_loss(model(xm), ym) / k).backward()
    accumulated = grads(model)

    assert big.keys() == accumulated.keys()
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in big.values())
