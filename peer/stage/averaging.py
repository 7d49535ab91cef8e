"""Per-stage averaging: the peers of one stage form a ``hivemind.Optimizer`` collaboration.

Run id ``{run}_stage{k}``, target batch = the run's global ``--batch-size``. Gradients
accumulate in the stage module's ``.grad`` (``reuse_grad_buffers``): each backward adds the
gradient of one microbatch's mean loss, and hivemind divides by the number of microbatches.
When the stage's peers together have processed a global batch, every peer all-reduces its
gradients with the others (weighted by samples), clips them (per stage: no peer sees the
other stages' gradients), and steps AdamW + the warmup/cosine schedule, whose position is
the collaboration's epoch, so all replicas agree on the learning rate. A stage with a single
peer steps alone without waiting for matchmaking. A newcomer downloads parameters,
optimizer and schedule state from its stage's peers before it serves.

With several replicas a round holds a little more than the target: each replica sees the others'
counts through hivemind's progress records, a fraction of a second late, and the microbatches it
processes in that time join the round (``make demo``: typically one microbatch over).

Who averages: the stage's other live replicas (their stage records, JOINING excluded, that also
have an averager declared in the collaboration). A replica with no samples of its own this epoch
joins the round at a negligible weight (``hivemind_ext.MIN_ROUND_WEIGHT``, not 0: see there); the
matchmaking's target group size is the replica count, so a group assembles as soon as all have joined.

Replicas stay equal: a peer that finds the collaboration an epoch ahead of it loads the
collaboration's state instead of stepping; a round that averaged with fewer peers than serve
the stage leaves the replicas apart, so every peer but the stage's donor (its live peer with
the lowest id) reloads the stage's state.

Who shares state: a replica shares its state once it holds the stage's state, with its epoch as
priority, and stops sharing while it knows its state is off (a round that left a replica out, or
a digest apart from the donor's); so downloads go to a good replica at the newest epoch, chosen at
random among equals. Each serves one download at a time and turns the others away to the next
donor (``hivemind_ext.StageStateAverager``), so newcomers joining together spread over the stage.

Everything that changes parameters (a global step, a resync from peers) runs through
``StageRuntime.apply_update``, which drains in-flight microbatches first; the bookkeeping
after each backward (counting samples, reporting progress)
does not touch parameters and runs without draining.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import random
import time

import torch

from peer.config import RunConfig
from peer.schedule import lr_at
from peer.training import param_groups

logger = logging.getLogger(__name__)
RESYNC_RETRY_S = 1.0  # after a resync that got no state
DHT_READ_TIMEOUT_S = 5.0
DONOR_RETRY_S = (0.3, 1.0)  # a joiner turned away by every donor waits a random time in this range, then asks again
DIGEST_TTL_S = 60.0  # a replica's published parameter digest expires after this (refreshed after every step)
NEXT_CHUNK_FRACTION = 1 / 3  # of --averaging-timeout: how long an all-reduce waits for a sender's next chunk
REQUEST_TIMEOUT_S = 1.0  # hivemind's averager request timeout (at most a third of the matchmaking time)
DECLARE_STATE_PERIOD_S = 10.0  # how long a dead peer still counts as a replica (see replicas())
TRACKER_REFRESH_S = {"min_refresh_period": 0.1, "max_refresh_period": 1.0, "default_refresh_period": 0.3}
NEVER_STEPS = 2**31  # hivemind's average_state_every when --average-state-every is 0 (state averaging off)
DIGEST_RTOL = 1e-6  # rounding moves a tensor's sum of squares by ~1e-9 relative; one step apart, by far more


class Due(enum.Enum):
    """What a replica has to do next (:meth:`StageOptimizer.decide`)."""

    STEP = "step"  # the collaboration has a global batch: average gradients and step
    RESYNC = "resync"  # the others stepped without us, or apart from us: load a good replica's state


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


class StageOptimizer:
    """hivemind collaboration of one stage, driven from the stage runtime's hooks.

    :param dht: the peer's hivemind DHT (not in client mode: peers all-reduce with each other)
    :param key: the key this peer signs its DHT records with; the collaboration's progress records are
        signed with it too (the node's signature validator refuses records of keys it cannot sign for)
    :param me: this peer's id in the stage records
    :param mates: ``() -> list[str]``, the ids of the other live peers of this stage (JOINING excluded)
    """

    def __init__(self, dht, run_id: str, stage: int, module: torch.nn.Module, cfg: RunConfig, key=None,
                 me: str = "", mates=list):
        from peer.stage.hivemind_ext import StageCollaborationOptimizer  # hivemind only once a peer averages

        o, s = cfg.optim, cfg.peer
        decay = cfg.decay_steps

        def make_optimizer(groups):
            return ClippedAdamW(groups, max_norm=o.grad_clip, lr=o.lr, betas=(o.beta1, o.beta2))

        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: lr_at(epoch, o.lr, o.min_lr, o.warmup_steps, decay) / o.lr)

        self.stage, self.module, self.me, self._mates = stage, module, me, mates
        self.dirty = False  # our last round did not include every replica: reload from the donor
        self.opt = StageCollaborationOptimizer(
            dht=dht, run_id=f"{run_id}_stage{stage}", params=param_groups(module, o.weight_decay),
            optimizer=make_optimizer, scheduler=make_scheduler, target_batch_size=cfg.train.batch_size,
            reuse_grad_buffers=True, matchmaking_time=s.matchmaking_time, averaging_timeout=s.averaging_timeout,
            load_state_timeout=s.averaging_timeout, delay_state_averaging=False,
            # hivemind's default (the matchmaking time) drops a sender that stalls that long from its part of the
            # all-reduce: on busy CPUs the replicas then get different averages for that part and drift apart
            next_chunk_timeout=s.averaging_timeout * NEXT_CHUNK_FRACTION,
            average_state_every=s.average_state_every or NEVER_STEPS,
            # hivemind: a request timeout under the matchmaking time, or groups can fail to form
            averager_opts={"request_timeout": min(REQUEST_TIMEOUT_S, s.matchmaking_time / 3),
                           "declare_state_period": DECLARE_STATE_PERIOD_S},
            tracker_opts={**TRACKER_REFRESH_S, "private_key": key},
            verbose=bool(os.environ.get("SWARM_HIVEMIND_VERBOSE")),  # hivemind's own progress log
        )
        # hivemind also downloads the gradient averager's buffers on every load, then zeroes them: not worth a
        # donor's upload
        self.opt.grad_averager.allow_state_sharing = False
        self.steps = 0
        self.resyncs = 0
        self.leaving = False  # moving to another stage: no more rounds here (the others no longer wait for us)
        self._patience = 2 * s.averaging_timeout
        self._resync_not_before = 0.0
        # what the DHT says, read by refresh() off the serving loop: declared averagers, and the epoch at which
        # the donor's digest differs from ours (None: not apart, as far as we know)
        self._averagers, self._apart_at = 0, None
        self._digest_key, self._digest = f"{run_id}_stage{stage}_digests", None

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    @property
    def lr(self) -> float:
        return self.opt.state_averager.optimizer.param_groups[0]["lr"]

    def load_state_from_peers(self, patience: float | None = None) -> bool:
        """Download the stage's current state from its peers (before serving); False if none sent one.

        While every donor is busy sending its state to other newcomers, try again for up to ``patience``
        seconds (default: twice the averaging timeout)."""
        deadline = time.monotonic() + (self._patience if patience is None else patience)
        attempt = 0
        while True:
            attempt += 1
            try:
                loaded = self._download()
            except Exception as e:  # the peers went away: start from a checkpoint or the run's seed
                logger.info("stage %d: no state downloaded from peers (%s)", self.stage, e)
                return False
            if loaded:
                logger.info("stage %d: loaded the stage's state from its peers (epoch %d%s)", self.stage,
                            self.epoch, f", attempt {attempt}" if attempt > 1 else "")
                return True
            if self._declared_averagers() == 0 or time.monotonic() > deadline:
                logger.info("stage %d: no peer sent its state (%d attempts)", self.stage, attempt)
                return False
            logger.info("stage %d: every donor is busy or sent nothing; trying again", self.stage)
            time.sleep(random.uniform(*DONOR_RETRY_S))

    def _download(self) -> bool:
        """One download of the stage's state; True if a state was loaded. hivemind moves a peer one epoch
        behind to the collaboration's epoch even when nothing was loaded: undone then, so that the stale
        parameters still look stale."""
        epoch = self.opt.local_epoch
        self.opt.load_state_from_peers()
        if self.opt.state_averager.last_download_ok:
            return True
        self.opt.state_averager.local_epoch = epoch
        return False

    # ---- checkpoints (for a stage whose peers all went away) ----

    def checkpoint_state(self) -> dict:
        """Parameters, optimizer state and epoch of this stage replica."""
        return {"model": self.module.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch}

    @torch.no_grad()
    def load_checkpoint(self, state: dict) -> None:
        """Load a :meth:`checkpoint_state` (before serving): parameters into the module and the optimizer's
        offloaded copies, optimizer statistics, epoch and learning-rate schedule."""
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # also sets the local epoch
        self.opt.state_averager.load_main_parameters()
        self.opt.tracker.report_local_progress(self.opt.local_epoch, 0)

    # ---- hooks for StageRuntime ----

    def accumulate(self, samples: int) -> None:
        """Count a backward's samples and report progress (no parameter changes)."""
        self.opt.grad_averager.accumulate_grads_(samples)
        self.opt.tracker.report_local_progress(self.opt.local_epoch, self.opt.grad_averager.local_samples_accumulated)
        # No pre-scheduled matchmaking: peers' estimates of the epoch's end differ, and a group scheduled on a
        # stale estimate fails; every peer starts looking when it sees the global batch complete instead.

    def replicas(self) -> int:
        """How many other replicas to average with: live stage-mates (their stage records, JOINING excluded)
        that also take part in the collaboration (their averagers are declared as state donors), so that a
        record with no averager behind it (a hung or forged peer) does not make every round wait for it.

        Not from the collaboration's progress records: a stage-mate that has not processed a microbatch yet
        publishes none, and a peer that stepped alone on that view would leave its mate waiting for a group."""
        return min(self.mates(), self._averagers)

    def mates(self) -> int:
        """How many other live peers serve this stage (from their stage records)."""
        return len(self._mates())

    def donor(self) -> bool:
        """Whether this peer is its stage's donor: the live peer with the lowest id."""
        return self.donor_id() == self.me

    def donor_id(self) -> str:
        """The lowest id among this peer and its live stage-mates."""
        return min([self.me, *self._mates()])

    # ---- digests: replicas at the same epoch compare their parameters through the DHT ----

    @torch.no_grad()
    def digest(self) -> list[float]:
        """Per parameter tensor, the float64 sum of squares: equal across replicas up to the all-reduce's
        rounding, apart by far more after a step on different gradients (a round that lost a part)."""
        return [float(p.detach().double().pow(2).sum()) for p in self.module.parameters()]

    def publish_digest(self) -> None:
        """Publish this replica's epoch and digest (after every step, resync and load)."""
        from hivemind.utils import get_dht_time  # hivemind only once a peer averages, as in __init__

        self._digest = (self.epoch, self.digest())
        self.opt.dht.store(self._digest_key, subkey=self.me, value=[self.epoch, self._digest[1]],
                           expiration_time=get_dht_time() + DIGEST_TTL_S, return_future=True)

    def diverged(self) -> bool:
        """The donor's parameters at our epoch differ from ours (as of the last :meth:`refresh`)."""
        return self._apart_at is not None and self._apart_at == self.epoch and not self.donor()

    def refresh(self) -> None:
        """The DHT reads :meth:`decide` relies on: blocking, so :meth:`watch` runs them off the serving loop,
        about once a second (and the peer once before it serves)."""
        self._averagers = self._declared_averagers()
        self._apart_at = self._apart_from_donor()

    def _apart_from_donor(self) -> int | None:
        """Our epoch if the donor's digest at that epoch differs from ours, else None (also when not comparable)."""
        donor, mine = self.donor_id(), self._digest
        if donor == self.me or mine is None:
            return None
        found = self._dht_get(self._digest_key)
        entry = found.value.get(donor) if found is not None and isinstance(found.value, dict) else None
        if entry is None or not isinstance(entry.value, list) or len(entry.value) != 2:
            return None
        (epoch, theirs), (my_epoch, my_digest) = entry.value, mine
        if epoch != my_epoch or not isinstance(theirs, list):
            return None  # not comparable yet
        apart = len(theirs) != len(my_digest) or not all(
            isinstance(b, float) and math.isclose(a, b, rel_tol=DIGEST_RTOL, abs_tol=1e-12)
            for a, b in zip(my_digest, theirs, strict=True))
        if not apart:
            return None
        logger.warning("stage %d: parameters differ from the donor's at epoch %d (a round that lost a part?): "
                       "reloading its state", self.stage, my_epoch)
        return my_epoch

    def _dht_get(self, key: str):
        """A DHT read that gives up after ``DHT_READ_TIMEOUT_S`` (None), so a slow DHT never stalls refresh()."""
        try:
            return self.opt.dht.get(key, latest=True, return_future=True).result(timeout=DHT_READ_TIMEOUT_S)
        except TimeoutError:
            logger.debug("stage %d: DHT read of %s timed out", self.stage, key)
            return None

    def _declared_averagers(self) -> int:
        averager = self.opt.state_averager
        found = self._dht_get(f"{averager.prefix}.all_averagers")
        if found is None or not isinstance(found.value, dict):
            return 0
        me = averager.peer_id.to_bytes()
        # sharing or not (a replica whose state is off declares None): each takes part in the collaboration
        return sum(1 for peer in found.value if peer != me)

    def alone(self) -> bool:
        """No other replica serves this stage (see :meth:`replicas`)."""
        return self.replicas() == 0

    def ready(self) -> bool:
        """The collaboration has processed a global batch (alone: exactly when we have).

        Together, a peer joins the round even with no samples of its own this epoch (at a negligible weight),
        so that every replica steps with the same averaged gradients; and no time-based guesses, so that
        leftovers at the end of a run do not make a peer step on its own."""
        tracker, local = self.opt.tracker, self.opt.grad_averager.local_samples_accumulated
        if self.alone():
            return local >= tracker.target_batch_size
        return max(local, tracker.global_progress.samples_accumulated) >= tracker.target_batch_size

    def decide(self) -> str | None:
        """:attr:`Due.RESYNC`, :attr:`Due.STEP` or None. A pre-check on the serving loop; :meth:`update` decides again,
        drained, so that a step already under way is never repeated."""
        if self.leaving:
            return None
        tracker = self.opt.tracker
        if not self.alone() and (tracker.global_epoch > self.opt.local_epoch or (self.dirty and not self.donor())
                                 or self.diverged()):
            # the others stepped without us, or apart from us: a good replica's state replaces ours
            if time.monotonic() >= self._resync_not_before:
                return Due.RESYNC
            if tracker.global_epoch > self.opt.local_epoch:
                return None  # behind: nothing to do until the next try
            # apart but at the collaboration's epoch: keep stepping with the others (skipping a round would leave
            # them short of a replica) until the next try
        return Due.STEP if self.ready() else None

    def update(self) -> None:
        """Run on the compute worker with the stage drained: a global step or a resync, if still due."""
        decision = self.decide()
        if decision is Due.RESYNC:
            logger.info("stage %d: out of sync (epoch %d, collaboration at %d): loading state from peers",
                        self.stage, self.opt.local_epoch, self.opt.tracker.global_epoch)
            loaded = self._download()
            self.opt.grad_averager.reset_accumulated_grads_()
            if loaded:
                self.resyncs += 1
                self.dirty = False
                self._apart_at = None  # the next refresh compares with the donor again
            else:  # every donor was busy (or went away): try again in a moment, not after every microbatch
                logger.info("stage %d: no peer sent its state; retrying the resync shortly", self.stage)
                self._resync_not_before = time.monotonic() + RESYNC_RETRY_S
        elif decision is Due.STEP:
            logger.debug("stage %d: step %d with %d local samples, %d peers, global epoch %d", self.stage,
                         self.opt.local_epoch, self.opt.grad_averager.local_samples_accumulated,
                         self.opt.tracker.global_progress.num_peers, self.opt.tracker.global_epoch)
            expected = 1 + self.replicas()
            self.opt.together, self.opt.last_group_size = expected > 1, 1
            # a group assembles as soon as every live replica has joined (not after the whole matchmaking time)
            self.opt.grad_averager.set_target_group_size(expected)
            self.opt.refresh_global_epoch()
            self.steps += 1
            self.dirty = self.opt.last_group_size < expected and not self.donor()
            if self.opt.last_group_size < expected:
                logger.info("stage %d: step %d averaged with %d of %d peers%s", self.stage, self.opt.local_epoch,
                            self.opt.last_group_size, expected, "" if self.donor() else "; reloading from the donor")
        self.share_state()
        if not self.alone():  # a lone replica has no one to compare with (a newcomer copies its state anyway)
            self.publish_digest()

    def share_state(self) -> None:
        """State sharing, once this replica holds the stage's state: on, with the epoch as priority, unless our
        state is known to be off (a round that left a replica out, or a digest apart from the donor's); then
        off, so that newcomers and resyncing replicas download from a good replica at the newest epoch (at
        random among equals: hivemind breaks ties at random)."""
        averager, good = self.opt.state_averager, not (self.dirty or self.diverged())
        averager.state_sharing_priority = float(self.opt.local_epoch)
        if averager.allow_state_sharing != good:
            averager.allow_state_sharing = good

    async def on_backward(self, runtime, samples: int) -> None:
        self.accumulate(samples)
        await self.maybe_update(runtime)

    async def maybe_update(self, runtime) -> None:
        if self.decide() is not None:
            await runtime.apply_update(self.update)

    async def watch(self, runtime, period: float = 0.2, refresh_every: float = 1.0) -> None:
        """Keep the DHT views fresh (in a worker thread), and also step when no microbatch arrives (the
        collaboration may be ready without us)."""
        loop, refreshed, failures = asyncio.get_running_loop(), time.monotonic(), 0
        while True:
            await asyncio.sleep(period)
            try:
                if time.monotonic() - refreshed >= refresh_every:
                    await loop.run_in_executor(None, self.refresh)
                    refreshed = time.monotonic()
                await self.maybe_update(runtime)
                failures = 0
            except Exception as e:  # keep serving; the next period retries
                failures += 1
                logger.warning("stage %d: update failed (%d in a row): %s", self.stage, failures, e,
                               exc_info=failures == 1)  # where it fails, once per streak

    def shutdown(self) -> None:
        self.opt.shutdown()
