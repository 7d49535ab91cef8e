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

A step holds the target batch: the backwards that finish once a replica knows the batch is complete
(those in flight while its update drains, those it serves before the step) go to the next step
(:mod:`peer.stage.late_grads`). With several replicas a step can still hold a little more: each
replica learns the others' counts through hivemind's progress records, a fraction of a second late.

Who averages (:class:`peer.stage.replicas.ReplicaView`, where all of this module's DHT reads are):
the stage's other live replicas (their stage records, JOINING excluded, that also have an averager
declared in the collaboration). A replica with no samples of its own this epoch joins the round at a
negligible weight (``hivemind_ext.MIN_ROUND_WEIGHT``, not 0: see there); the matchmaking's target
group size is the replica count, so a group assembles as soon as all have joined.

Replicas stay equal: a peer that finds the collaboration an epoch ahead of it loads the
collaboration's state instead of stepping; a round that averaged with fewer peers than serve
the stage leaves the replicas apart, so every peer but the stage's donor (the live peer whose id
hashes lowest with the epoch) reloads the stage's state.

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
import collections
import enum
import logging
import os
import random
import time

import torch

from peer.config import RunConfig
from peer.schedule import lr_at
from peer.stage.adamw import ClippedAdamW
from peer.stage.late_grads import LateGradients
from peer.stage.replicas import ReplicaView
from peer.training import param_groups

logger = logging.getLogger(__name__)
RESYNC_RETRY_S = 1.0  # after a resync that got no state
DONOR_RETRY_S = (0.3, 1.0)  # a joiner turned away by every donor waits a random time in this range, then asks again
NEXT_CHUNK_FRACTION = 1 / 3  # of --averaging-timeout: how long an all-reduce waits for a sender's next chunk
REQUEST_TIMEOUT_S = 1.0  # hivemind's averager request timeout (at most a third of the matchmaking time)
DECLARE_STATE_PERIOD_S = 10.0  # how long a dead peer still counts as a replica (see ReplicaView.replicas)
TRACKER_REFRESH_S = {"min_refresh_period": 0.1, "max_refresh_period": 1.0, "default_refresh_period": 0.3}
NEVER_STEPS = 2**31  # hivemind's average_state_every when --average-state-every is 0 (state averaging off)
NEAR_END_S = 1.0  # see StageOptimizer._complete
STEPS_KEPT = 1000  # the last steps' sample counts kept for the peer's summary


class Due(enum.Enum):
    """What a replica has to do next (:meth:`StageOptimizer.decide`)."""

    STEP = "step"  # the collaboration has a global batch: average gradients and step
    RESYNC = "resync"  # the others stepped without us, or apart from us: load a good replica's state


class StageOptimizer:
    """hivemind collaboration of one stage, driven from the stage runtime's hooks.

    :param dht: the peer's hivemind DHT (not in client mode: peers all-reduce with each other)
    :param key: the key this peer signs its DHT records with; the collaboration's progress records are
        signed with it too (the node's signature validator refuses records of keys it cannot sign for)
    :param me: this peer's id in the stage records
    :param mates: ``() -> list[Mate]``, the other live peers of this stage (JOINING excluded), from their signed
        stage records
    :param members: ``() -> set of DHT peer ids`` that may take part in a gradient round: every live record holder
        of the stage (default: the mates')
    """

    def __init__(self, dht, run_id: str, stage: int, module: torch.nn.Module, cfg: RunConfig, key=None,
                 me: str = "", mates=list, members=None):
        from peer.stage.hivemind_ext import StageCollaborationOptimizer  # hivemind only once a peer averages

        o, s = cfg.optim, cfg.peer
        decay = cfg.decay_steps

        def make_optimizer(groups):
            return ClippedAdamW(groups, max_norm=o.grad_clip, lr=o.lr, betas=(o.beta1, o.beta2))

        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: lr_at(epoch, o.lr, o.min_lr, o.warmup_steps, decay) / o.lr)

        self.stage, self.module, self._members = stage, module, members
        self.dirty = False  # our last round did not include every replica: reload from the donor
        self.opt = StageCollaborationOptimizer(
            dht=dht, run_id=f"{run_id}_stage{stage}", params=param_groups(module, o.weight_decay),
            optimizer=make_optimizer, scheduler=make_scheduler, target_batch_size=cfg.train.batch_size,
            reuse_grad_buffers=True, matchmaking_time=s.matchmaking_time, averaging_timeout=s.averaging_timeout,
            load_state_timeout=s.state_download_timeout, delay_state_averaging=False,
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
        averager, tracker = self.opt.state_averager, self.opt.tracker
        self.view = ReplicaView(dht, run_id, stage, me, mates, f"{averager.prefix}.all_averagers",
                                averager.peer_id.to_bytes(), tracker.training_progress_key, tracker._local_public_key)
        tracker.allowed = self.view.progress_subkeys  # a stranger's progress record moves no epoch here
        self.late = LateGradients(module, self._complete)
        self.steps = 0
        self.resyncs = 0
        self.carried = 0  # late microbatches moved to the next step
        self.step_samples: collections.deque[tuple[int, int]] = collections.deque(maxlen=STEPS_KEPT)
        self.leaving = False  # moving to another stage: no more rounds here (the others no longer wait for us)
        self._patience = 2 * s.averaging_timeout
        self._resync_not_before = 0.0

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    @property
    def lr(self) -> float:
        return self.opt.state_averager.optimizer.param_groups[0]["lr"]

    @property
    def local_samples(self) -> int:
        """Samples in this replica's gradients for the current epoch."""
        return self.opt.grad_averager.local_samples_accumulated

    # ---- state: from peers, or from a checkpoint (peer.stage.checkpoints) ----

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
            if not self.view.declared_averagers() or time.monotonic() > deadline:
                logger.info("stage %d: no peer sent its state (%d attempts)", self.stage, attempt)
                return False
            logger.info("stage %d: every donor is busy or sent nothing; trying again", self.stage)
            time.sleep(random.uniform(*DONOR_RETRY_S))

    def _download(self) -> bool:
        """One download of the stage's state; True if a state was loaded. hivemind moves a peer one epoch
        behind to the collaboration's epoch even when nothing was loaded: undone then, so that the stale
        parameters still look stale."""
        epoch = self.opt.local_epoch
        self.opt.state_averager.set_donors(self.view.donor_peer_ids())  # only replicas its stage records name
        self.opt.load_state_from_peers()
        if self.opt.state_averager.last_download_ok:
            return True
        self.opt.state_averager.local_epoch = epoch
        return False

    def state_dict(self) -> dict:
        """Parameters, optimizer state and epoch of this stage replica (what a checkpoint holds)."""
        return {"model": self.module.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict` (before serving): parameters into the module and the optimizer's offloaded
        copies, optimizer statistics, epoch and learning-rate schedule."""
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # also sets the local epoch
        self.opt.state_averager.load_main_parameters()
        self.opt.tracker.report_local_progress(self.opt.local_epoch, 0)

    # ---- the decision ----

    def accumulate(self, samples: int) -> None:
        """Count a backward's samples and report progress (no parameter changes)."""
        self.opt.grad_averager.accumulate_grads_(samples)
        self.opt.tracker.report_local_progress(self.opt.local_epoch, self.local_samples)
        # No pre-scheduled matchmaking: peers' estimates of the epoch's end differ, and a group scheduled on a
        # stale estimate fails; every peer starts looking when it sees the global batch complete instead.

    def ready(self) -> bool:
        """The collaboration has processed a global batch (alone: exactly when we have).

        Together, a peer joins the round even with no samples of its own this epoch (at a negligible weight),
        so that every replica steps with the same averaged gradients; and no time-based guesses, so that
        leftovers at the end of a run do not make a peer step on its own."""
        return self._known(self.local_samples) >= self.opt.tracker.target_batch_size

    def _known(self, counted: int) -> int:
        """The epoch's samples as far as this replica knows, its own backwards holding ``counted`` of them: alone,
        those; together, at least the collaboration's count plus ours that it does not hold yet."""
        if self.view.alone():
            return counted
        ahead = max(0, counted - self.local_samples)  # ours, not yet in the collaboration's count
        return max(counted, self.opt.tracker.global_progress.samples_accumulated + ahead)

    def _complete(self, counted: int, samples: int):
        """For :mod:`peer.stage.late_grads`, on the compute worker before the backward of a microbatch of
        ``samples``, this replica's backwards holding ``counted`` samples of the epoch so far (the worker's count
        runs ahead of the serving loop's by a backward or so): a callable that says, after the backward, whether
        the batch was complete without it.

        Alone, our count decides. Together, the others' counts in hivemind's progress records, as the tracker
        fetches them every 0.1-1 s, are often older than a microbatch; so near the end of the epoch (by that
        view: the batch is one microbatch short, or the others' rates say it may be complete within
        ``NEAR_END_S``, or the tracker has not fetched this epoch yet) the records are read again while the
        backward runs, in the DHT's own process."""
        from hivemind.utils import get_dht_time  # hivemind only once a peer averages, as in __init__

        tracker = self.opt.tracker
        target = tracker.target_batch_size
        if self.view.alone():
            return lambda: counted >= target
        near = (self._known(counted) + samples >= target or not tracker.fetched_global_progress_this_epoch.is_set()
                or get_dht_time() >= tracker.global_progress.eta_next_epoch - NEAR_END_S)
        epoch, read = self.epoch, self.view.read_progress() if near else None

        def complete() -> bool:
            if self._known(counted) >= target:
                if read is not None:
                    read.cancel()
                return True
            others = self.view.others_samples(read, epoch) if read is not None else None
            return others is not None and counted + others >= target

        return complete

    def diverged(self) -> bool:
        return self.view.diverged(self.epoch)

    def decide(self) -> Due | None:
        """:attr:`Due.RESYNC`, :attr:`Due.STEP` or None. A pre-check on the serving loop; :meth:`update` decides
        again, drained, so that a step already under way is never repeated."""
        if self.leaving:
            return None
        tracker = self.opt.tracker
        if not self.view.alone() and (tracker.global_epoch > self.opt.local_epoch
                                      or (self.dirty and not self.view.is_donor(self.epoch)) or self.diverged()):
            # the others stepped without us, or apart from us: a good replica's state replaces ours
            if time.monotonic() >= self._resync_not_before:
                return Due.RESYNC
            if tracker.global_epoch > self.opt.local_epoch:
                return None  # behind: nothing to do until the next try
            # apart but at the collaboration's epoch: keep stepping with the others (skipping a round would leave
            # them short of a replica) until the next try
        return Due.STEP if self.ready() else None

    # ---- the update (on the compute worker, drained) ----

    def update(self) -> None:
        """Run on the compute worker with the stage drained: a global step or a resync, if still due. Gradients
        that came in after the batch was complete go to the next epoch (dropped by a resync)."""
        late = self.late.take()
        decision = self.decide()
        if decision is Due.RESYNC:
            self._resync()
            late = None  # computed on the parameters the resync replaced, like the epoch's own
        elif decision is Due.STEP:
            self._step()
        if late is not None:
            grads, samples = late
            self.late.add_to_grads(grads)
            for n in samples:
                self.accumulate(n)
            self.carried += len(samples)
        self.late.restart(self.local_samples)
        self.share_state()
        # also when this replica thinks it is alone: if it stepped alone on a stale view, the digest is how the
        # others' donor (or this replica, if it is not the donor) finds out that their parameters went apart
        self.publish_digest()

    def _resync(self) -> None:
        logger.info("stage %d: out of sync (epoch %d, collaboration at %d): loading state from peers",
                    self.stage, self.opt.local_epoch, self.opt.tracker.global_epoch)
        loaded = self._download()
        self.opt.grad_averager.reset_accumulated_grads_()
        if loaded:
            self.resyncs += 1
            self.dirty = False
            self.view.forget_apart()
        else:  # every donor was busy (or went away): try again in a moment, not after every microbatch
            logger.info("stage %d: no peer sent its state; retrying the resync shortly", self.stage)
            self._resync_not_before = time.monotonic() + RESYNC_RETRY_S

    def _step(self) -> None:
        epoch, samples = self.opt.local_epoch, self.local_samples
        logger.debug("stage %d: step %d with %d local samples, %d peers, global epoch %d", self.stage, epoch,
                     samples, self.opt.tracker.global_progress.num_peers, self.opt.tracker.global_epoch)
        expected = 1 + self.view.replicas()
        self.opt.together, self.opt.last_group_size = expected > 1, 1
        # a group assembles as soon as every live replica has joined (not after the whole matchmaking time)
        self.opt.grad_averager.set_target_group_size(expected)
        # only peers its stage's signed records name (JOINING ones too: a view a moment old must not refuse a
        # replica that has just come ONLINE)
        self.opt.grad_averager.set_members(self._members() if self._members else self.view.donor_peer_ids())
        # no more than a replica's signed progress shows, and never more than the whole batch
        batch = float(self.opt.tracker.target_batch_size)
        self.opt.grad_averager.set_weight_caps(self.opt.tracker.weight_caps(epoch, batch), default=batch)
        self.opt.refresh_global_epoch()  # hivemind's epoch update: all-reduce (together) and optimizer step
        self.steps += 1
        self.step_samples.append((epoch, samples))
        donor = self.view.is_donor(self.opt.local_epoch)
        self.dirty = self.opt.last_group_size < expected and not donor
        if self.opt.last_group_size < expected:
            logger.info("stage %d: step %d averaged with %d of %d peers%s", self.stage, self.opt.local_epoch,
                        self.opt.last_group_size, expected, "" if donor else "; reloading from the donor")

    def share_state(self) -> None:
        """State sharing, once this replica holds the stage's state: on, with the epoch as priority, unless our
        state is known to be off (a round that left a replica out, or a digest apart from the donor's); then
        off, so that newcomers and resyncing replicas download from a good replica at the newest epoch (at
        random among equals: hivemind breaks ties at random)."""
        averager, good = self.opt.state_averager, not (self.dirty or self.diverged())
        averager.state_sharing_priority = float(self.opt.local_epoch)
        if averager.allow_state_sharing != good:
            averager.allow_state_sharing = good

    def publish_digest(self) -> None:
        """Publish this replica's epoch and parameter digest (after every step, resync and load)."""
        self.view.publish(self.epoch, self.module)

    # ---- hooks for StageRuntime ----

    async def on_backward(self, runtime, samples: int, late: bool = False) -> None:
        if not late:  # late samples are counted by self.late, and join the next epoch at the update
            self.accumulate(samples)
        await self.maybe_update(runtime)

    async def maybe_update(self, runtime) -> None:
        # also when gradients were set aside as late but the batch no longer looks complete (a replica's progress
        # record expired): the update hands them back to this epoch, or no sample would count towards it
        if self.decide() is not None or (self.late.active and not self.ready()):
            await runtime.apply_update(self.update)

    async def watch(self, runtime, period: float = 0.2, refresh_every: float = 1.0) -> None:
        """Keep the DHT views fresh (in a worker thread), and also step when no microbatch arrives (the
        collaboration may be ready without us)."""
        loop, refreshed, failures = asyncio.get_running_loop(), time.monotonic(), 0
        while True:
            await asyncio.sleep(period)
            try:
                if time.monotonic() - refreshed >= refresh_every:
                    await loop.run_in_executor(None, self.view.refresh)
                    refreshed = time.monotonic()
                await self.maybe_update(runtime)
                failures = 0
            except Exception as e:  # keep serving; the next period retries
                failures += 1
                logger.warning("stage %d: update failed (%d in a row): %s", self.stage, failures, e,
                               exc_info=failures == 1)  # where it fails, once per streak

    def shutdown(self) -> None:
        self.opt.shutdown()
