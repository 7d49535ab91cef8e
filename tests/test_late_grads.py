"""A stage's optimizer step holds ``--batch-size`` samples: backwards that finish once the batch is complete
(in flight while the update drains) go to the next step, with their gradients (real hivemind optimizer on a
one-node DHT, real stage runtime and compute worker)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dht.testing import LocalSwarm
from peer.config import load_config
from peer.partition import lm_loss
from peer.stage.averaging import StageOptimizer
from peer.stage.late_grads import LateGradients
from peer.stage.runtime import StageRuntime, StageSpec
from stage_helpers import run_async

H, V, T, MB = 4, 11, 3, 2  # hidden, vocab, sequence, microbatch


def microbatch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(MB, T, H, generator=g), torch.randint(0, V, (MB, T), generator=g)


def grads_of(module, batches) -> list[torch.Tensor]:
    """Sum of the per-microbatch mean-loss gradients of ``batches`` at ``module``'s parameters."""
    module.zero_grad(set_to_none=True)
    for x, y in batches:
        lm_loss(module(x), y).backward()
    return [p.grad.clone() for p in module.parameters()]


def test_backwards_after_the_batch_is_complete_write_the_next_epochs_gradients():
    module = torch.nn.Linear(H, V)
    batches = [microbatch(i) for i in range(5)]
    reference = torch.nn.Linear(H, V)
    reference.load_state_dict(module.state_dict())
    late = LateGradients(module, complete=lambda counted, samples: lambda: counted >= 2 * MB)
    filed = [late.run(lambda x=x, y=y: lm_loss(module(x), y).backward(), MB) for x, y in batches]
    assert filed == [False, False, True, True, True]
    assert late.active and late.counted == 2 * MB and late.samples == [MB] * 3
    for got, want in zip([p.grad for p in module.parameters()], grads_of(reference, batches[:2]), strict=True):
        torch.testing.assert_close(got, want)  # .grad holds the epoch's gradients, alone
    taken = late.take()
    assert taken is not None and not late.active and late.samples == []
    grads, samples = taken
    for got, want in zip(grads, grads_of(reference, batches[2:]), strict=True):
        torch.testing.assert_close(got, want)
    assert samples == [MB] * 3
    module.zero_grad(set_to_none=False)  # what the step leaves
    late.add_to_grads(grads)
    late.restart(sum(samples))
    for got, want in zip([p.grad for p in module.parameters()], grads_of(reference, batches[2:]), strict=True):
        torch.testing.assert_close(got, want)
    assert late.take() is None  # nothing late since


def test_nothing_is_late_while_the_batch_is_incomplete():
    module = torch.nn.Linear(H, V)
    reference = torch.nn.Linear(H, V)
    reference.load_state_dict(module.state_dict())
    late = LateGradients(module, complete=lambda counted, samples: lambda: False)
    batches = [microbatch(i) for i in range(3)]
    for x, y in batches:
        assert not late.run(lambda x=x, y=y: lm_loss(module(x), y).backward(), MB)
    assert late.counted == 3 * MB and late.take() is None
    for got, want in zip([p.grad for p in module.parameters()], grads_of(reference, batches), strict=True):
        torch.testing.assert_close(got, want)


def test_a_backward_that_fails_leaves_the_sums_as_they_were():
    module = torch.nn.Linear(H, V)
    late = LateGradients(module, complete=lambda counted, samples: lambda: False)
    x, y = microbatch(0)
    late.run(lambda: lm_loss(module(x), y).backward(), MB)
    before = [p.grad.clone() for p in module.parameters()]

    def broken():
        lm_loss(module(x), y).backward()  # its gradients are written, then it fails
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        late.run(broken, MB)
    assert late.counted == MB and not late.active
    assert all(torch.equal(p.grad, b) for p, b in zip(module.parameters(), before, strict=True))


@pytest.fixture
def lone_stage():
    """A stage with one replica: target batch 4 microbatches, its optimizer driving a real runtime."""
    cfg = load_config({"preset": "tiny", "batch_size": 4 * MB, "microbatch_size": MB, "grad_clip": 0.0})
    swarm = LocalSwarm("late", size=1)
    torch.manual_seed(0)
    module = torch.nn.Linear(H, V)
    optimizer = StageOptimizer(swarm.nodes[0].dht, "late", 0, module, cfg, me="me", mates=lambda: [])
    runtime = StageRuntime(module, StageSpec("late", 0, 1, H, V), on_backward=optimizer.on_backward,
                           late_grads=optimizer.late)
    try:
        yield module, optimizer, runtime
    finally:
        runtime.stop()
        optimizer.shutdown()
        swarm.close()


def test_a_step_holds_the_target_batch_and_the_drained_backwards_start_the_next(lone_stage):
    module, optimizer, runtime = lone_stage
    reference = torch.nn.Linear(H, V)
    reference.load_state_dict(module.state_dict())
    batches = [microbatch(i) for i in range(8)]

    async def train(chunk):  # all at once: the last ones are in flight when the batch completes
        await asyncio.gather(*(runtime.last_stage(x, y, backward=True) for x, y in chunk))

    run_async(train(batches[:6]))  # 6 microbatches for a batch of 4: the step drains the other 2
    adam = optimizer.opt.state_averager.optimizer
    expected = torch.cat([g.flatten() for g in grads_of(reference, batches[:4])]) / 4  # hivemind's mean
    assert list(optimizer.step_samples) == [(0, 4 * MB)] and optimizer.steps == 1
    assert adam.last_grad_norm == pytest.approx(float(expected.norm()), rel=1e-5)
    assert optimizer.carried == 2 and optimizer.local_samples == 2 * MB and optimizer.late.counted == 2 * MB
    assert runtime.version_violations == 0

    run_async(train(batches[6:]))  # two more complete the second batch: the two carried and these two
    assert list(optimizer.step_samples) == [(0, 4 * MB), (1, 4 * MB)] and optimizer.epoch == 2
    assert optimizer.local_samples == 0 and not optimizer.late.active
