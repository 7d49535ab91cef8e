"""Two small extensions of hivemind's optimizer that the stage collaboration needs.

* :class:`GroupSizedGradientAverager` can change its matchmaking's target group size while it
  runs: set to the number of live replicas of the stage, a round's group assembles as soon as
  every replica has joined instead of waiting out the whole matchmaking time.
* :class:`StageCollaborationOptimizer` averages when the stage's DHT records say other replicas
  serve it, and remembers how many peers its last round averaged with, so that the stage can
  tell a round that left a replica out.
"""

from __future__ import annotations

import logging

import hivemind
from hivemind.optim.grad_averager import GradientAverager

logger = logging.getLogger(__name__)


class GroupSizedGradientAverager(GradientAverager):
    """A gradient averager whose target group size can be set between rounds."""

    def set_target_group_size(self, size: int) -> None:
        """Takes effect for the next matchmaking (the averager's process handles commands in order)."""
        self._outer_pipe.send(("_set_target_group_size", [int(size)], {}))

    async def _set_target_group_size(self, size: int) -> None:  # runs in the averager's process
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size


class StageCollaborationOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose gradient rounds follow the stage's own view of its replicas.

    :attr:`together` (set before each step) says whether other replicas serve the stage; hivemind's
    own test, more than one peer in the progress records, misses a replica that has not processed a
    microbatch yet (it publishes no progress), which would then step alone while the others wait.
    :attr:`last_group_size` is the size of the group the last round averaged with (1: none).
    """

    together = False
    last_group_size = 1

    def __init__(self, **kwargs):
        super().__init__(grad_averager_factory=GroupSizedGradientAverager, **kwargs)

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        assert grad_scaler is None, "stage peers do not use a grad scaler"
        # Rounds are never pre-scheduled here, so a control still held is the last round's, finished; hivemind
        # would take it as a failed pre-scheduled round and skip averaging this time.
        self.scheduled_grads = None
        if not self.together:
            return False  # alone: the local gradients are the stage's gradients
        try:
            self.scheduled_grads = self.grad_averager.step(reset_accumulators=True, wait=False)
        except Exception:
            logger.exception("could not start a gradient averaging round; stepping with the local gradients")
            return False
        return True

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        self.last_group_size = 1
        if maybe_step_control is not None:
            try:
                self.last_group_size = len(maybe_step_control.result(self.averaging_timeout))
            except BaseException:  # the round failed: hivemind falls back to the local gradients
                pass
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
