"""What each thing costs in simulated seconds: compute, transfers, averaging rounds, state downloads.

* **Compute** of a microbatch on stage ``k``: ``6 * cost_k * tokens / (peak * mfu)`` seconds, where ``cost_k`` is
  the stage's multiply-adds per token from :func:`peer.shapes.stage_costs` (the numbers the rebalancing policy
  scales throughputs by), 2 FLOPs a multiply-add, forward 1/3 and backward 2/3 of it (:data:`FORWARD_SHARE`). A
  backward whose forward ran before the stage's last optimizer step recomputes its forward first (the runtime's
  ``--drain-timeout 0``).
* **Activations** a hop carries: ``microbatch x seq_len x hidden x codec bytes`` (gradients back: the same);
  stage 0 receives token ids (8 bytes each).
* **Transfer** A -> B: ``bytes / min(bandwidth A, bandwidth B) + latency A + latency B`` on idle links; A's uplink
  and B's downlink are queues, so busy links add their backlog (:meth:`peer.sim.dataplane.DataPlane.send`).
* **Averaging round** of a stage's ``n`` peers (butterfly all-reduce: each sends and receives ``2 (n-1)/n`` of the
  gradients, :data:`GRAD_BYTES` per parameter): ``matchmaking + 2 (n-1)/n * grads / slowest bandwidth +
  2 x largest latency``; none with a single peer (it steps alone, as ``hivemind.Optimizer`` does).
* **State download** of a joiner: :data:`STATE_BYTES` per parameter of its stage at its own bandwidth, plus a fixed
  ``join_s`` (records, finding a donor, going ONLINE).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from peer.shapes import ModelSpec, spec_of, stage_costs, stage_layer_ranges
from peer.sim.world import DEVICES, Link

FORWARD_SHARE = 1 / 3  # a backward costs about twice its forward
# bytes per activation value on the wire, by --codec (int8: one float32 scale per 256-value block, as
# peer.rpc.codecs.INT8_BLOCK lays it out)
CODEC_BYTES = {"none": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / 256}
TOKEN_BYTES = 8  # int64 token ids into stage 0
GRAD_BYTES = 4  # fp32 gradients in the all-reduce (it is not compressed)
STATE_BYTES = 12  # fp32 parameters + AdamW's two moments, per parameter (PeerConfig.state_download_timeout)
DONE_BYTES = 64  # the trainer's "done" after stage 0's backward: nothing to send back


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model and how it is trained: what the simulated swarm computes and sends."""

    name: str
    spec: ModelSpec
    vocab_size: int
    seq_len: int
    microbatch: int  # sequences per microbatch
    batch_per_peer: int  # sequences per optimizer step and initial peer: a stage averages after its peers together
    # processed batch_per_peer x peers sequences (a data-parallel batch grows with the swarm)
    partition: str = "balanced"
    matchmaking_s: float = 2.0  # --matchmaking-time: how long a round's peers look for each other
    join_s: float = 3.0  # a joiner's fixed cost besides the bytes (DHT records, finding a donor, going ONLINE):
    # benchmarks/rebalance.py measured a move of a `tiny` stage at 2.6 to 3.9 s

    @property
    def tokens_per_microbatch(self) -> int:
        return self.microbatch * self.seq_len


LLAMA_1B = ModelSpec("llama", hidden=2048, intermediate=5632, heads=16, layers=24, max_positions=2048)
LLAMA_7B = ModelSpec("llama", hidden=4096, intermediate=11008, heads=32, layers=32, max_positions=4096)
WORKLOADS = {
    # a 1.2B-parameter Llama, 2,048-token sequences, 32 per microbatch; a step every 1,024 sequences per peer (2M
    # tokens: at 100 Mbit/s a stage's fp32 all-reduce takes minutes, so steps must be rare)
    "llama-1b": Workload("llama-1b", LLAMA_1B, 32000, 2048, 32, 1024),
    "llama-7b": Workload("llama-7b", LLAMA_7B, 32000, 2048, 8, 1024),
}


def stage_parameters(spec: ModelSpec, vocab_size: int, ranges: Sequence[range]) -> list[int]:
    """Parameters of each stage: its layers, the embeddings on the first, the LM head on the last (norms, a few
    thousand, left out)."""
    h, i = spec.hidden, spec.intermediate
    layer = 4 * h * h + (3 if spec.arch == "llama" else 2) * h * i
    last = len(ranges) - 1
    return [len(r) * layer + (vocab_size * h if k == 0 else 0) + (vocab_size * h if k == last else 0)
            for k, r in enumerate(ranges)]


class Costs:
    """The cost model of one workload cut into ``stages`` stages, sending with ``codec``."""

    def __init__(self, workload: Workload, stages: int, peers: int, codec: str = "none", mfu: float = 0.35):
        w = workload
        self.workload, self.stages, self.codec, self.mfu = w, stages, codec, mfu
        self.batch = w.batch_per_peer * max(peers, 1)  # sequences per optimizer step
        spec = spec_of(w.spec)
        self.policy_costs = stage_costs(spec, w.vocab_size, w.seq_len, stages, w.partition)  # multiply-adds/token
        ranges = stage_layer_ranges(spec, w.vocab_size, w.seq_len, stages, w.partition)
        self.parameters = stage_parameters(spec, w.vocab_size, ranges)
        self.flops = [6.0 * c * w.tokens_per_microbatch for c in self.policy_costs]  # fwd+bwd per microbatch
        activation = w.microbatch * w.seq_len * spec.hidden * CODEC_BYTES[codec]
        # bytes into stage k (forward) and back out of it (its input's gradient, backward)
        self.bytes_in = [float(w.microbatch * w.seq_len * TOKEN_BYTES)] + [activation] * (stages - 1)
        self.bytes_back = [float(DONE_BYTES)] + [activation] * (stages - 1)

    def device_flops(self, device: str) -> float:
        return DEVICES[device].peak_flops * self.mfu

    def compute_s(self, flops: float, stage: int) -> float:
        """Forward + backward of one microbatch on ``stage`` for a device doing ``flops`` FLOP/s."""
        return self.flops[stage] / flops

    def samples_per_s(self, flops: float, stage: int) -> float:
        """What a peer measures and announces for ``stage``: sequences/s of forward + backward."""
        return self.workload.microbatch / self.compute_s(flops, stage)

    def link_s(self, stage: int, link: Link) -> float:
        """Seconds one microbatch keeps the busier direction of a stage peer's link busy: forward activations in and
        gradients out one way, activations out and gradients in the other (what bounds a link-bound peer)."""
        into = self.bytes_in[stage] + (self.bytes_back[stage + 1] if stage + 1 < self.stages else 0.0)
        out = self.bytes_back[stage] + (self.bytes_in[stage + 1] if stage + 1 < self.stages else 0.0)
        return max(into, out) / link.bytes_per_s

    def rate(self, flops: float, link: Link, stage: int) -> float:
        """Microbatches/s a peer sustains on ``stage`` when compute and its link overlap: the slower of the two."""
        return 1.0 / max(self.compute_s(flops, stage), self.link_s(stage, link))

    def round_s(self, stage: int, links: Sequence[Link]) -> float:
        """One averaging round of ``stage`` among peers with these links (0 for a single peer)."""
        n = len(links)
        if n <= 1:
            return 0.0
        grads = self.parameters[stage] * GRAD_BYTES
        slowest = min(lk.bytes_per_s for lk in links)
        return (self.workload.matchmaking_s + 2 * (n - 1) / n * grads / slowest
                + 2 * max(lk.latency_s for lk in links))

    def download_s(self, stage: int, link: Link) -> float:
        """A joiner's download of ``stage``'s parameters and optimizer state at its own bandwidth."""
        return self.workload.join_s + self.parameters[stage] * STATE_BYTES / link.bytes_per_s + 2 * link.latency_s
