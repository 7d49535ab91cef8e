"""How the swarm trainer retries one microbatch: every failure the swarm reports (HopFailed) is retried on
another route until the trainer stops, while an error that is not the swarm's (a bug here) is raised after
MAX_UNEXPECTED_ERRORS attempts instead of looping forever with a traceback each time."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from conftest import tiny_config
from dht.announce import new_peer_record
from dht.peers import LivePeer
from dht.records import PeerState
from peer.rpc import stage_pb2 as pb
from peer.rpc.client import StageClient
from peer.swarm import trainer as trainer_module
from peer.swarm.directory import Directory
from peer.swarm.trainer import MAX_UNEXPECTED_ERRORS, SwarmTrainer
from peer.training import StopFlag


def online_peer(stage: int, port: int) -> LivePeer:
    record = new_peer_record(stage, "0.1.0", state=PeerState.ONLINE, endpoint=f"127.0.0.1:{port}", throughput=10.0)
    return LivePeer(peer_id=f"p{stage}-{port}", subkey=b"k", record=record, expires_at=record.updated_at + 60)


class FailingClient(StageClient):
    """A client whose every hop fails with ``error`` (a real StageClient otherwise: nothing is dialled)."""

    def __init__(self, error: Exception, stop: StopFlag | None = None, stop_after: int = 0):
        super().__init__()
        self.error, self.stop, self.stop_after, self.calls = error, stop, stop_after, 0
        self.headers = []

    async def hop(self, address, messages, *args, **kwargs):
        self.calls += 1
        self.headers.append(pb.HopRequest.FromString(messages[0]).header)
        if self.stop is not None and self.calls >= self.stop_after:
            self.stop.set("test")
        raise self.error


@pytest.fixture
def trainer(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(trainer_module, "RETRY_BACKOFF_S", (0.001, 0.001))  # the schedule is not under test
    cfg = tiny_config(tmp_path, stages=2)
    directory = Directory(lambda: {0: [online_peer(0, 1)], 1: [online_peer(1, 2)]}, num_stages=2)
    directory.refresh()
    stop = StopFlag()
    yield SwarmTrainer(cfg, directory, stop), stop


def microbatch(trainer: SwarmTrainer):
    x = torch.zeros((trainer.cfg.train.microbatch_size, trainer.cfg.data.seq_len), dtype=torch.long)
    return x, x.clone()


def test_an_unexpected_error_is_raised_after_a_few_attempts(trainer):
    swarm_trainer, stop = trainer
    client = FailingClient(TypeError("a bug in the trainer"), stop=stop, stop_after=10)  # else: stopped, no raise
    with pytest.raises(TypeError, match="a bug in the trainer"):
        asyncio.run(swarm_trainer.hop(client, 0, *microbatch(swarm_trainer)))
    assert client.calls == MAX_UNEXPECTED_ERRORS
    assert swarm_trainer.counters["failures"] == MAX_UNEXPECTED_ERRORS


def test_failures_of_the_swarm_are_retried_until_the_trainer_stops(trainer):
    swarm_trainer, stop = trainer
    refused = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    client = FailingClient(refused, stop=stop, stop_after=4 * MAX_UNEXPECTED_ERRORS)
    assert asyncio.run(swarm_trainer.hop(client, 0, *microbatch(swarm_trainer))) is None  # stopped, not raised
    assert client.calls == 4 * MAX_UNEXPECTED_ERRORS
    # one peer per stage: each attempt tries it, finds no other peer and fails with HopFailed
    assert swarm_trainer.counters["failures"] == client.calls
    # each attempt says which it is, so the stages' logs tell a retry from a new microbatch
    assert [h.attempt for h in client.headers] == list(range(client.calls))
    assert {h.microbatch_id for h in client.headers} == {f"{swarm_trainer.trainer_id}:0"}
