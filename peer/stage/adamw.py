"""The optimizer a stage steps with: AdamW that clips first and skips a step whose gradients are not finite."""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips the norm of the gradients it is about to apply (0 disables), and skips a
    step whose gradients are not finite (``skipped`` counts them): one NaN in an averaged gradient would
    otherwise turn every parameter of the stage NaN, on every replica and on every newcomer after them.

    Its state is filled at creation exactly as AdamW's first step would (step 0, zero moments):
    hivemind otherwise "initialises" an empty optimizer by running a step with zero gradients,
    which applies weight decay once and shifts Adam's bias correction by one step.
    """

    def __init__(self, params, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.last_grad_norm = math.nan
        self.skipped = 0
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            bound = self.max_norm if self.max_norm > 0 else math.inf
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, bound))
            if not math.isfinite(self.last_grad_norm):
                self.skipped += 1
                logger.warning("gradient norm is %s: step skipped, parameters unchanged (%d skipped so far)",
                               self.last_grad_norm, self.skipped)
                return None
        return super().step(closure)
