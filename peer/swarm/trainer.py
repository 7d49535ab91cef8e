"""``swarm-peer train``: a data owner that streams microbatches through the swarm.

The trainer reads its shard of the data, keeps ``--in-flight`` microbatches in flight, each
a Hop to a stage-0 peer chosen by the router (which carries it through the other stages
and brings the loss back), and logs the baseline's metrics per global batch plus the
swarm's: retries, failures, peers and throughput per stage, the stages' optimizer epochs.
A microbatch that fails is retried on another route until it succeeds (every retry is
counted; none is dropped); while a stage has no live peer the trainer waits and says so.
With ``--step-sync`` it finishes each global batch before sending the next, so that its
steps are exactly the baseline's; otherwise microbatches flow continuously (SWARM).
A ``--check-fraction`` of microbatches is sent again along another route and the losses
compared (:mod:`peer.swarm.checks`); peers caught answering what they could not have
computed are routed around from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid

from tqdm.auto import tqdm

from peer import __version__
from peer.config import RunConfig
from peer.data import TrainStream, Windows, load_data, validation_batches
from peer.metrics import MetricsLog, StepTimer, eval_line, eval_record, human, perplexity, train_record
from peer.rpc import stage_pb2 as pb
from peer.rpc.client import HopFailed, HopOutcome, StageClient, hop_with_retries, request_messages
from peer.rpc.tensors import CODEC_TO_PB
from peer.schedule import lr_at
from peer.swarm.checks import ResultChecker, Route
from peer.swarm.directory import Directory, StageRouter
from peer.session import Session, check_tokenizer, endpoint_scope
from peer.training import StopFlag, limit_threads, run_dir_for

logger = logging.getLogger("peer.train")
WAIT_LOG_S = 5.0
RETRY_BACKOFF_S = (0.2, 5.0)  # a failed microbatch waits 0.2 s * 2^attempt before its next route, at most 5 s
MAX_UNEXPECTED_ERRORS = 3  # errors other than HopFailed (a bug, not the swarm) on one microbatch before giving up


class SwarmTrainer:
    def __init__(self, cfg: RunConfig, directory: Directory, stop: StopFlag, fingerprint: str = "", record=None,
                 credential=None):
        """:param record: the run's config record: this trainer's tokenizer must be the one it names
        :param credential: ``() -> gRPC metadata`` for every hop (an invite-only run's, see ``dht.admission``)"""
        self.cfg, self.directory, self.stop, self.credential = cfg, directory, stop, credential
        t, d, s = cfg.train, cfg.data, cfg.trainer
        data = load_data(d)
        check_tokenizer(record, data.tokenizer, cfg)
        self.stream = TrainStream(Windows(data.train, d.seq_len), t.microbatch_size, t.seed,
                                  shard=s.trainer_index, num_shards=s.num_trainers)
        self.val = validation_batches(Windows(data.validation, d.seq_len), t.microbatch_size, t.eval_batches)
        self.router = StageRouter(directory, 0, seed=t.seed + s.trainer_index, scope=endpoint_scope(cfg))
        self.checker = ResultChecker(s.check_fraction, s.check_tolerance, seed=t.seed + s.trainer_index)
        self.trainer_id = f"trainer-{s.trainer_index}-{uuid.uuid4().hex[:6]}"
        self.run_id, self.run_dir, _ = run_dir_for(cfg, "train")
        self.codec = CODEC_TO_PB[cfg.link.codec]
        self.accum = cfg.grad_accum
        self.max_microbatches = t.max_steps * self.accum
        if s.max_tokens:
            self.max_microbatches = min(self.max_microbatches,
                                        math.ceil(s.max_tokens / (t.microbatch_size * d.seq_len)))
        self.counters = {"sent": 0, "microbatches": 0, "retries": 0, "failures": 0, "waits": 0, "abandoned": 0}
        self.stage_busy: dict[int, list[float]] = {}  # stage -> [compute seconds, queue seconds] of our microbatches
        self.failing_since: float | None = None  # first failure since the last success
        self.recoveries: list[float] = []  # seconds from a failure to the next microbatch that got through
        self.step_losses: dict[int, list[float]] = {}
        self.step_started: dict[int, float] = {}
        self.done_steps = 0
        self._next = itertools.count()
        self._step_done = asyncio.Condition()
        self._last_wait_log = 0.0
        self.waiting = False

    @property
    def max_recovery_s(self) -> float:
        """The longest time from a failure to the next microbatch that got through (0: none)."""
        return float(round(max(self.recoveries), 2)) if self.recoveries else 0.0

    # ---- one microbatch ----

    def _header(self, mb: int, forward_only: bool = False, attempt: int = 0, avoid: frozenset[str] = frozenset(),
                distrusted: frozenset[str] = frozenset()) -> pb.MicrobatchHeader:
        """The microbatch's id (``<trainer id>:<index>``) and attempt travel with it, into every stage's logs; the
        addresses every stage should route around with it, too."""
        return pb.MicrobatchHeader(run_id=self.cfg.swarm_run_id, microbatch_id=f"{self.trainer_id}:{mb}",
                                   trainer_id=self.trainer_id, stage=0, budget_s=self.cfg.link.hop_timeout,
                                   forward_codec=self.codec, backward_codec=self.codec, forward_only=forward_only,
                                   attempt=attempt, avoid=sorted(avoid), distrusted=sorted(distrusted))

    async def _wait_for_stages(self) -> None:
        """Block (with a status line every few seconds) while some stage has no live peer."""
        while not self.stop:
            empty = [k for k, n in self.directory.counts().items() if n == 0]
            if not empty and self.router.live_count():
                self.waiting = False
                return
            self.waiting = True
            self.counters["waits"] += 1
            now = time.time()
            if now - self._last_wait_log > WAIT_LOG_S:
                logger.warning("waiting for stage %s: no live peers", ", ".join(map(str, empty or [0])))
                self._last_wait_log = now
            await asyncio.sleep(0.5)

    async def hop(self, client: StageClient, mb: int, x, y, forward_only: bool = False,
                  avoid: frozenset[str] = frozenset()) -> HopOutcome | None:
        """Send one microbatch until it gets through (or the trainer stops: None), around the peers the checks
        distrust and then ``avoid`` while there are others."""
        attempt = unexpected = 0
        while not self.stop:
            distrusted = self.checker.avoid  # as of this attempt: a check may have caught a peer meanwhile
            await self._wait_for_stages()
            messages = request_messages(self._header(mb, forward_only, attempt, avoid, distrusted),
                                        {"input_ids": x, "labels": y},
                                        self.cfg.link.codec)  # token ids: cheap to encode again for a retry
            try:
                outcome = await hop_with_retries(client, self.router, messages, [],
                                                 time.monotonic() + self.cfg.link.hop_timeout,
                                                 attempt_timeout=self.cfg.link.attempt_timeout, avoid=avoid,
                                                 distrusted=distrusted)
            except Exception as e:  # HopFailed: the swarm failed it, retried; anything else is retried a few times
                attempt += 1
                self.counters["failures"] += 1
                self.failing_since = self.failing_since or time.monotonic()
                if isinstance(e, HopFailed):
                    logger.info("microbatch %d failed (%s); retrying on another route (attempt %d)", mb, e, attempt + 1)
                else:
                    unexpected += 1
                    if unexpected >= MAX_UNEXPECTED_ERRORS:
                        raise  # the same error again and again is a bug here, not a fault of the swarm: surface it
                    logger.exception("microbatch %d: unexpected error; retrying (attempt %d)", mb, attempt + 1)
                await asyncio.sleep(min(RETRY_BACKOFF_S[1], RETRY_BACKOFF_S[0] * 2 ** min(attempt, 5)))
                continue
            self.counters["retries"] += attempt + outcome.retries + sum(t.retries for t in outcome.result.timings)
            if self.failing_since is not None:  # the swarm carries microbatches again: how long did that take?
                self.recoveries.append(time.monotonic() - self.failing_since)
                self.failing_since = None
            for timing in outcome.result.timings:
                busy = self.stage_busy.setdefault(timing.stage, [0.0, 0.0])
                busy[0] += timing.forward_s + timing.backward_s
                busy[1] += timing.queue_s
            return outcome
        return None

    async def _check(self, client: StageClient, mb: int, x, y, outcome: HopOutcome) -> None:
        """Send microbatch ``mb`` again along other routes and compare (see :mod:`peer.swarm.checks`)."""
        async def again(avoid: frozenset[str]) -> Route | None:
            other = await self.hop(client, mb, x, y, forward_only=True, avoid=avoid)
            return route_of(other) if other is not None else None

        await self.checker.check(route_of(outcome), again)

    # ---- training ----

    async def _worker(self, client: StageClient) -> None:
        while not self.stop:
            mb = next(self._next)
            if mb >= self.max_microbatches:
                return
            step = mb // self.accum
            if self.cfg.trainer.step_sync:
                async with self._step_done:
                    await self._step_done.wait_for(lambda step=step: self.done_steps >= step or bool(self.stop))
            self.step_started.setdefault(step, time.perf_counter())
            x, y = self.stream.next()
            self.counters["sent"] += 1
            outcome = await self.hop(client, mb, x, y)
            if outcome is None:  # stopped while it was in flight
                self.counters["abandoned"] += 1
                return
            self.counters["microbatches"] += 1
            self.step_losses.setdefault(step, []).append(outcome.result.loss)
            await self._maybe_finish_steps()
            if self.checker.due():
                await self._check(client, mb, x, y, outcome)

    async def _maybe_finish_steps(self) -> None:
        """Log every global batch whose microbatches have all come back, in order."""
        async with self._step_done:
            while len(self.step_losses.get(self.done_steps, [])) == self.accum:
                step = self.done_steps
                self.done_steps += 1
                self.on_step(step, self.step_losses.pop(step))
                self._step_done.notify_all()

    def on_step(self, step: int, losses: list[float]) -> None:
        """Overridden by the CLI runner to log; the default only keeps the losses."""

    async def evaluate(self, client: StageClient) -> float:
        """Mean validation loss over the fixed validation batches (forward only, through the swarm)."""
        results = await asyncio.gather(*(self.hop(client, -1 - i, x, y, forward_only=True)
                                         for i, (x, y) in enumerate(self.val)))
        losses = [r.result.loss for r in results if r is not None]
        return sum(losses) / len(losses) if losses else math.nan


def route_of(outcome: HopOutcome) -> Route:
    """The route a microbatch took: the stage-0 peer this trainer called, then each next one as reported."""
    timings = outcome.result.timings
    return Route(outcome.result.loss, (outcome.address, *(t.next for t in timings if t.next)),
                 tuple(t.epoch for t in timings))


class TrainerRun(SwarmTrainer):
    """A :class:`SwarmTrainer` with the console, JSONL and W&B metrics of the baseline."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # all set here, not in run(): live_counters() reads them from another thread, also before run() starts
        self.timer, self.last_loss, self.first_loss, self.val_loss = StepTimer(), math.nan, None, None
        self.tokens_per_step = self.cfg.train.batch_size * self.cfg.data.seq_len
        self.pending_eval: list[int] = []  # steps to evaluate after; -1: evaluation is over
        self.run_started = self.last_step_end = time.perf_counter()
        self.step_ends: list[float] = []

    def live_counters(self) -> dict:
        """The counters ``swarm-peer inspect`` shows (a :class:`dht.records.TrainerRecord`'s changing fields)."""
        c = self.counters
        return {"state": "WAITING" if self.waiting else "TRAINING", "steps": self.done_steps,
                "microbatches_sent": c["sent"], "microbatches_done": c["microbatches"], "retries": c["retries"],
                "failures": c["failures"], "bans": int(self.router.bans), "waits": c["waits"],
                "recoveries": len(self.recoveries), "max_recovery_s": self.max_recovery_s,
                "checks": self.checker.counters["checks"], "caught": self.checker.counters["caught"],
                "distrusted": [a for a in self.checker.distrusted if len(a) <= 64],  # what the record takes
                "tokens_per_s": float(self._recent_tokens_per_s()) if self.step_ends else 0.0,
                "loss": float(self.last_loss) if math.isfinite(self.last_loss) else None}

    async def run(self) -> dict:
        t, d = self.cfg.train, self.cfg.data
        self.metrics = MetricsLog(self.run_dir, self.run_id, self.cfg.log.wandb_project, self.cfg.log.wandb_mode,
                                  self.cfg.model_dump(mode="json"))
        total_steps = self.max_microbatches // self.accum
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=None if self.cfg.log.progress else True,
                        leave=False)
        client = StageClient(credential=self.credential)
        started = self.run_started = self.last_step_end = time.perf_counter()
        logger.info("trainer %s: %d x %d-token microbatches, %d in flight, %d steps of %d sequences, run dir %s",
                    self.trainer_id, t.microbatch_size, d.seq_len, self.cfg.trainer.in_flight, total_steps,
                    t.batch_size, self.run_dir)
        try:
            workers = [asyncio.ensure_future(self._worker(client)) for _ in range(self.cfg.trainer.in_flight)]
            evaluator = asyncio.ensure_future(self._eval_loop(client))
            await asyncio.gather(*workers)
            self.pending_eval.append(self.done_steps)  # the final evaluation
            self.pending_eval.append(-1)
            await evaluator
        finally:
            await client.close()
            self.bar.close()
        summary = {
            "kind": "summary", "command": "train", "run_id": self.run_id, "run_dir": str(self.run_dir),
            "trainer_id": self.trainer_id, "preset": self.cfg.model.preset, "stages": self.cfg.model.stages,
            "steps": self.done_steps, "microbatches": self.counters["microbatches"], "first_loss": self.first_loss,
            "final_loss": self.last_loss if self.done_steps else None, "val_loss": self.val_loss,
            "val_ppl": perplexity(self.val_loss),
            "tokens": self.done_steps * self.tokens_per_step,
            # microbatches flow continuously, so steps end in bursts: throughput over the whole run
            "tokens_per_s": self.done_steps * self.tokens_per_step / max(self.last_step_end - started, 1e-9),
            "median_step_time": self.timer.median_step_time, "train_time_s": time.perf_counter() - started,
            "microbatches_sent": self.counters["sent"], "retries": self.counters["retries"],
            "failures": self.counters["failures"],
            # taken from the data but neither completed nor in flight when the trainer stopped: must be 0
            "lost_microbatches": self.counters["sent"] - self.counters["microbatches"] - self.counters["abandoned"],
            "abandoned_at_stop": self.counters["abandoned"],
            "waits": self.counters["waits"], "recoveries": len(self.recoveries),
            "max_recovery_s": self.max_recovery_s,
            "bans": self.router.bans, "peers_per_stage": self.directory.counts(),
            "checks": dict(self.checker.counters), "distrusted": list(self.checker.distrusted),
            "stage_compute_s": {k: round(v[0], 2) for k, v in sorted(self.stage_busy.items())},
            "stage_queue_s": {k: round(v[1], 2) for k, v in sorted(self.stage_busy.items())},
            "stopped_by": self.stop.signal_name if self.stop else None,
        }
        self.metrics.write(summary)
        self.metrics.close()
        return summary

    def on_step(self, step: int, losses: list[float]) -> None:
        now = time.perf_counter()
        self.timer.add(now - self.last_step_end, self.tokens_per_step)
        self.last_step_end = now
        self.step_ends.append(now)
        number = step + 1
        self.last_loss = sum(losses) / len(losses)
        self.first_loss = self.first_loss if self.first_loss is not None else self.last_loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.last_loss:.3f}")
        t = self.cfg.train
        if number % self.cfg.log.log_interval == 0 or number == 1 or number * self.accum >= self.max_microbatches:
            o = self.cfg.optim
            epochs = {k: max((p.record.step for p in self.directory.peers(k)), default=0)
                      for k in range(self.cfg.model.stages)}
            record = train_record(
                number, self.last_loss, lr_at(step, o.lr, o.min_lr, o.warmup_steps, self.cfg.decay_steps),
                self.tokens_per_step, t.batch_size, self.timer.durations[-1],
                tokens_per_s=self._recent_tokens_per_s(), retries=self.counters["retries"],
                failures=self.counters["failures"], bans=self.router.bans, max_recovery_s=self.max_recovery_s,
                peers_per_stage=list(self.directory.counts().values()),
                stage_throughput=[round(self.directory.throughput(k), 1) for k in range(self.cfg.model.stages)],
                stage_epochs=list(epochs.values()))
            self.metrics.write(record)
            logger.info(
                f"step {number}/{self.max_microbatches // self.accum} | loss {self.last_loss:.4f} "
                f"| lr {record['lr']:.2e} | {human(record['tokens_per_s'])} tok/s "
                f"| {record['step_time'] * 1000:.0f} ms/step | retries {record['retries']} "
                f"| peers {'/'.join(map(str, record['peers_per_stage']))} "
                f"| epochs {'/'.join(map(str, record['stage_epochs']))}")
        if t.eval_interval and number % t.eval_interval == 0 and number * self.accum < self.max_microbatches:
            self.pending_eval.append(number)

    def _recent_tokens_per_s(self, window: int = 5) -> float:
        """Throughput over the last few steps (a single step's time is noisy: steps end in bursts)."""
        ends = [self.run_started, *self.step_ends][-(window + 1):]
        return (len(ends) - 1) * self.tokens_per_step / max(ends[-1] - ends[0], 1e-9)

    async def _eval_loop(self, client: StageClient) -> None:
        while True:
            if not self.pending_eval:
                await asyncio.sleep(0.2)
                continue
            step = self.pending_eval.pop(0)
            if step < 0 or self.stop:
                return
            self.val_loss = await self.evaluate(client)
            record = eval_record(step, self.val_loss)
            self.metrics.write(record)
            logger.info(eval_line(record))


def run_trainer(cfg: RunConfig, stop: StopFlag) -> dict:
    """``swarm-peer train``: join the run as a client, then train until done or stopped."""
    from dht.peers import routable_peers  # hivemind (and its uvloop policy) only when a trainer runs
    from dht.trainers import TrainerAnnouncer

    limit_threads(cfg.train.threads)
    session = Session(cfg, client_mode=True, role="trainer").start()
    cfg, node = session.cfg, session.node
    directory = Directory(lambda: routable_peers(node, cfg.model.stages), cfg.model.stages, refresh_s=1.0).start()
    loop = asyncio.SelectorEventLoop()  # our own standard loop, whatever policy hivemind installed
    announcer = None
    try:
        trainer = TrainerRun(cfg, directory, stop, session.fingerprint, session.record,
                             credential=session.admission.credential)
        announcer = TrainerAnnouncer(node, trainer.trainer_id, __version__, trainer.live_counters,
                                     cfg.net.update_period).start()
        summary = loop.run_until_complete(trainer.run())
        announcer.stop({**trainer.live_counters(), "lost": max(0, summary["lost_microbatches"])})
        announcer = None
        return summary
    finally:
        if announcer is not None:  # training failed: the last counters, still marked DONE
            announcer.stop(trainer.live_counters())
        loop.close()
        directory.stop()
        session.shutdown()
