"""A stage's optimizer steps never turn its parameters non-finite: a step whose gradients are NaN or inf
is skipped, and a gradient round whose replicas hold no samples averages to zeros, not 0/0 (real hivemind
averagers on a local DHT)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from dht.testing import LocalSwarm
from peer.config import load_config
from peer.stage.adamw import ClippedAdamW
from peer.stage.averaging import StageOptimizer
from peer.stage.replicas import Mate
from waiting import wait_until

RUN = "rounds"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_the_step_and_keeps_the_parameters(bad):
    param = torch.nn.Parameter(torch.ones(8))
    optimizer = ClippedAdamW([param], max_norm=1.0, lr=0.1, weight_decay=0.1)
    param.grad = torch.ones(8)
    param.grad[3] = bad
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(8)) and optimizer.skipped == 1
    assert not math.isfinite(optimizer.last_grad_norm)
    assert float(optimizer.state[param]["step"]) == 0  # Adam's moments and step count untouched as well
    assert torch.equal(optimizer.state[param]["exp_avg"], torch.zeros(8))
    param.grad = torch.ones(8)  # the next good gradient steps as usual
    optimizer.step()
    assert optimizer.skipped == 1 and optimizer.last_grad_norm == pytest.approx(math.sqrt(8))
    assert (param.detach() < 1).all()


@pytest.mark.slow
def test_replicas_with_no_samples_average_to_zeros_not_nan():
    """Every replica in the group joins with no samples of its own (its samples' sender left after reporting
    them): hivemind divides each part's weighted sum by the weights that reached it, 0 / 0 without a floor."""
    cfg = load_config({"preset": "tiny", "matchmaking_time": 1.0, "averaging_timeout": 10.0})
    swarm = LocalSwarm(RUN, size=2)
    replicas: list[StageOptimizer] = []
    try:
        for i in range(2):
            torch.manual_seed(0)
            module = torch.nn.Linear(4, 4)
            module(torch.randn(2, 4)).sum().backward()  # gradient buffers exist, as after a served microbatch
            me, other = f"peer{i}", f"peer{1 - i}"
            node = swarm.nodes[1 - i]  # the other's records: what its signed stage record would name
            replica = StageOptimizer(swarm.nodes[i].dht, RUN, 0, module, cfg, key=swarm.nodes[i].key, me=me,
                                     mates=lambda o=other, n=node: [Mate(o, n.owner_subkey, str(n.dht.peer_id))])
            replica.opt.grad_averager.reset_accumulated_grads_()  # ... and the epoch's samples went elsewhere
            replica.ready = lambda: True  # the collaboration's count says the global batch is done
            replica.share_state()  # it holds the stage's state (from the seed): its averager is declared
            replicas.append(replica)
        def see_each_other() -> bool:
            for r in replicas:
                r.view.refresh()
            return all(r.view.replicas() == 1 for r in replicas)

        wait_until(see_each_other, 20, "the replicas seeing each other's averagers")
        threads = [threading.Thread(target=r.update) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for r in replicas:
            adam = r.opt.state_averager.optimizer
            assert r.steps == 1 and r.opt.last_group_size == 2, (r.steps, r.opt.last_group_size)
            assert adam.last_grad_norm == 0.0 and adam.skipped == 0, (adam.last_grad_norm, adam.skipped)
            assert all(torch.isfinite(p).all() for p in r.module.parameters())
        first, second = (list(r.module.parameters()) for r in replicas)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    finally:
        for r in replicas:
            r.shutdown()
        swarm.close()
