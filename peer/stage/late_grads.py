"""Gradients that arrive after a stage's global batch is complete belong to the next step.

Once the collaboration has its batch, a replica still finishes backwards: the microbatches in flight
while its update drains, and those it serves before it learns that the others completed the batch.
Summed into ``.grad`` with the rest, they would make the step larger than ``--batch-size`` (``make
demo``, two replicas: a median of 40 samples per step for a batch of 32). So each backward writes
its microbatch's gradients into empty ``.grad`` buffers, and only once it has run (when the
replica knows the most about the others' counts) they are added to the epoch's sum, kept in
``.grad`` as hivemind expects, or, if the batch is complete by then, to a sum of late gradients;
the update adds those to the next epoch's, with their sample counts.

The cost: one addition per parameter per microbatch, and one more set of gradient buffers while a
backward runs (two while late gradients wait).

Everything here runs on the compute worker thread (one job at a time), so the late gradients and
their sample counts always agree. It keeps its own count of the epoch's samples, because the serving
loop counts a backward's samples a moment after it ran, when the worker may already be running the next.
"""

from __future__ import annotations

from typing import Callable

import torch


def _add(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if total is None or grad is None:
        return grad if total is None else total
    return total.add_(grad)


class LateGradients:
    """The epoch's and the late gradients of one stage module.

    :param complete: ``(counted, samples) -> (() -> bool)``: called before the backward of a microbatch of
        ``samples``, with the samples this replica's backwards hold of the current epoch so far; what it returns
        is called after the backward, and says whether the epoch's global batch was complete without it (so
        that a DHT read can run meanwhile)
    """

    def __init__(self, module: torch.nn.Module, complete: Callable[[int, int], Callable[[], bool]]):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.complete = complete
        self.counted = 0  # samples of the current epoch's backwards
        self.samples: list[int] = []  # one entry per late microbatch
        self._late: list[torch.Tensor | None] | None = None  # their gradients' sum

    @property
    def active(self) -> bool:
        """Some backward's gradients wait for the next epoch."""
        return self._late is not None

    @torch.no_grad()
    def _split(self, epoch: list[torch.Tensor | None], late: bool) -> None:
        fresh = [p.grad for p in self.params]
        if late:
            self._late = fresh if self._late is None else [_add(t, g) for t, g in zip(self._late, fresh, strict=True)]
            for p, grad in zip(self.params, epoch, strict=True):
                p.grad = grad
        else:
            for p, total, grad in zip(self.params, epoch, fresh, strict=True):
                p.grad = _add(total, grad)

    def run(self, backward: Callable[[], None], samples: int) -> bool:
        """Run ``backward`` (which adds a microbatch's gradients to ``.grad``) and file its gradients under the
        current epoch or, if its batch is complete by now, the next; returns whether they went to the next.
        A backward that raises leaves the sums as they were."""
        answer = self.complete(self.counted, samples)
        epoch = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            backward()
        except BaseException:
            for p, grad in zip(self.params, epoch, strict=True):
                p.grad = grad
            raise
        late = answer()
        self._split(epoch, late)
        if late:
            self.samples.append(samples)
        else:
            self.counted += samples
        return late

    def take(self) -> tuple[list[torch.Tensor | None], list[int]] | None:
        """The late gradients and their microbatches' sample counts (for the update, drained), or None."""
        if self._late is None:
            return None
        late, samples = (self._late, self.samples)
        self._late, self.samples = None, []
        return late, samples

    @torch.no_grad()
    def add_to_grads(self, late: list[torch.Tensor | None]) -> None:
        """Add gradients from :meth:`take` to ``.grad`` (after the step: to the next epoch's)."""
        for p, grad in zip(self.params, late, strict=True):
            p.grad = _add(p.grad, grad)

    def restart(self, counted: int) -> None:
        """After an update: the current epoch's backwards now hold ``counted`` samples (the late ones it took in,
        or none after a resync)."""
        self.counted = counted
