"""Small extensions of hivemind's optimizer that the stage collaboration needs.

* :class:`GroupSizedGradientAverager` can change its matchmaking's target group size while it
  runs: set to the number of live replicas of the stage, a round's group assembles as soon as
  every replica has joined instead of waiting out the whole matchmaking time. It averages only with
  the DHT peer ids the stage's signed records name (``set_members``): as a follower it asks no other
  peer to lead it, as a leader it turns any other peer's join request away, and it refuses a round whose
  group holds any other peer. It clamps the weight a group-mate sends to twice the samples of that
  mate's signed progress record (``set_weight_caps``) in the parts it reduces.
* :class:`StageCollaborationOptimizer` averages when the stage's DHT records say other replicas
  serve it, and remembers how many peers its last round averaged with, so that the stage can
  tell a round that left a replica out.
* :class:`StageStateAverager` serves at most ``MAX_STATE_UPLOADS`` state downloads at once and
  refuses the others (an empty reply, which sends the downloader on to its next donor), so that
  newcomers joining together spread over the stage's donors instead of all pulling from one; it
  shares nothing until the stage turns sharing on, refuses a downloaded state with NaN or inf in
  it, downloads only from the DHT peer ids the stage's signed records name (``set_donors``), and
  says whether its own last download loaded a state.
* :class:`StageProgressTracker` counts only the progress records signed by the stage's replicas,
  so a stranger cannot set the collaboration's epoch or complete its batch.

This module is where the project reaches into hivemind's private methods and attributes (overrides, and the
two calls :meth:`StageStateAverager.load_main_parameters` and
:meth:`StageCollaborationOptimizer.refresh_global_epoch` wrap); :mod:`dht.signing` has the two on the DHT side.
All of them are pinned to hivemind 1.1.12: ``tests/test_hivemind_pins.py`` fails, naming the method, when the
installed hivemind's version of one of them changes.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import AsyncIterator, Callable, Iterable

import hivemind
import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import averaging_pb2

from peer.rpc.tensors import all_finite

logger = logging.getLogger(__name__)
MAX_STATE_UPLOADS = 1  # state downloads a peer serves at once: a volunteer's uplink is not split N ways
# weight of a replica with no samples in a gradient round: far below float32 rounding of the mean
MIN_ROUND_WEIGHT = 1e-9
UPLOAD_SLOT_S = 120.0  # an upload older than this no longer holds its slot (a stream its reader abandoned)
REFUSED_LOG_S = 60.0  # a stranger's join requests turned away are logged once per this many seconds per peer


class _Received:
    """Stands in for the MPFuture that hivemind's download fills, so the state can be checked first."""

    value = None

    def done(self) -> bool:
        return self.value is not None

    def set_result(self, value) -> None:
        self.value = value


class StageStateAverager(TrainingStateAverager):
    """A TrainingStateAverager that serves at most :data:`MAX_STATE_UPLOADS` downloads at once, starts with
    state sharing off (a newcomer has nothing to share until it has loaded or restored the stage's state),
    and records in ``last_download_ok`` whether its last :meth:`load_state_from_peers` loaded a state
    (received, and accepted: finite, not behind our epoch, complete, loadable into the optimizer).

    Its RPC handlers keep hivemind's TrainingStateAverager names, so it talks to stock averagers too.
    """

    last_download_ok = False

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_state_sharing", False)
        super().__init__(**kwargs)

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    def load_state_from_peers(self, **kwargs):
        self._accepted = False
        result = super().load_state_from_peers(**kwargs)
        self.last_download_ok = self._accepted
        return result

    def set_donors(self, donors: Iterable[str] | None) -> None:
        """Download only from these DHT peer ids (base58): what the stage's signed records name, whatever priority
        others declare under the collaboration's unsigned averagers key (None: from any). The averager's process
        handles commands in order, so this holds for the next download."""
        self._outer_pipe.send(("_set_donors", [None if donors is None else sorted(donors)], {}))

    async def _set_donors(self, donors: list[str] | None) -> None:  # runs in the averager's process
        self._donors = None if donors is None else frozenset(donors)

    _download_donors: frozenset[str] | None = None  # set in the averager's own process while it downloads

    @classmethod
    def get_stub(cls, p2p, peer, *, namespace=None):
        """hivemind asks for a stub per donor it tries, best declared priority first: during a download, a peer
        that the stage's records do not name is refused here, and the download goes on to the next. (A
        classmethod, as hivemind's: its all-reduce and matchmaking call it on the class.)"""
        donors = cls._download_donors
        if donors is not None and peer.to_base58() not in donors:
            logger.warning("not downloading the stage's state from %s: no stage record of this stage names it",
                           peer.to_base58())
            raise PermissionError(f"{peer} serves no stage record here")
        return super().get_stub(p2p, peer, namespace=namespace)

    def _update_scheduler(self):
        # hivemind calls this last, only once a downloaded state has been checked and loaded
        self._accepted = True
        super()._update_scheduler()

    @torch.no_grad()
    def load_main_parameters(self) -> None:
        """After the module's parameters were loaded from elsewhere (a checkpoint): copy them into the
        optimizer's offloaded copies and bring the learning-rate schedule to the local epoch, as hivemind does
        after a state download."""
        offloaded = [p for group in self.optimizer.param_groups for p in group["params"]]
        for main, copy in zip(self.main_parameters, offloaded, strict=True):
            copy.copy_(main)
        self._update_scheduler()

    async def _load_state_from_peers(self, future, timeout=None):  # runs in the averager's process
        """hivemind's download, but a state with a NaN or inf tensor is refused (nothing loaded), so that one
        broken or forged donor cannot spread non-finite parameters to every newcomer of the stage."""
        received = _Received()
        type(self)._download_donors = getattr(self, "_donors", None)  # this process holds only this averager
        try:
            await super()._load_state_from_peers(received, timeout=timeout)
        finally:
            type(self)._download_donors = None
        state = received.value
        if state is not None and not all(all_finite(t) for t in state[1] if t.is_floating_point()):
            logger.warning("refused a downloaded state: it contains NaN or inf")
            state = None
        future.set_result(state)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:  # runs in the averager's process
        now = time.monotonic()
        uploads = self.__dict__.setdefault("_uploads", {})
        for key in [k for k, started in uploads.items() if now - started > UPLOAD_SLOT_S]:
            del uploads[key]
        if len(uploads) >= MAX_STATE_UPLOADS:
            logger.info("already sending its state to %d peer(s): %s is sent to another donor", len(uploads),
                        context.remote_id)
            return
        key = uuid.uuid4()
        uploads[key] = now
        try:
            async for message in super().rpc_download_state(request, context):
                yield message
        finally:
            uploads.pop(key, None)


_strangers_logged: dict[tuple, float] = {}  # (message, peer) -> when: a stranger shows up again every round


def _log_stranger(peer, message: str) -> None:
    """Warn ``message % peer`` at most once per :data:`REFUSED_LOG_S` per peer and message."""
    now = time.monotonic()
    for key in [k for k, at in _strangers_logged.items() if now - at >= REFUSED_LOG_S]:
        del _strangers_logged[key]
    if (message, peer) not in _strangers_logged:
        _strangers_logged[message, peer] = now
        logger.warning(message, peer.to_base58())


class GroupSizedGradientAverager(GradientAverager):
    """A gradient averager whose target group size can be set between rounds, and whose rounds can be kept to
    the stage's replicas (:meth:`set_members`): the collaboration's matchmaking keys are unsigned, so any peer
    that knows the prefix could otherwise join a group and have its gradients averaged into every replica."""

    # set in the averager's own process, on the class: hivemind's get_stub is a classmethod, and each averager runs
    # in a process of its own
    _members: frozenset[str] | None = None

    def set_members(self, peer_ids: Iterable[str] | None) -> None:
        """Average only with these DHT peer ids (base58; ours always): what the stage's signed records name (None:
        with anyone). The averager's process handles commands in order, so this holds for the next round."""
        self._outer_pipe.send(("_set_members", [None if peer_ids is None else sorted(peer_ids)], {}))

    async def _set_members(self, peer_ids: list[str] | None) -> None:  # runs in the averager's process
        type(self)._members = None if peer_ids is None else frozenset([*peer_ids, self._p2p.peer_id.to_base58()])

    @classmethod
    def get_stub(cls, p2p, peer, *, namespace=None):
        """hivemind asks for a stub to each potential leader a follower asks to join (and to each peer of an
        all-reduce): a leader that is not a member is skipped here, as one that does not answer is, so that a
        stranger declaring itself the earliest leader cannot make every round fail. (A classmethod, as hivemind's.)"""
        members = cls._members
        if members is not None and peer.to_base58() not in members:
            _log_stranger(peer, "not asking %s to lead a gradient round: no stage record of this stage names it")
            raise P2PHandlerError(f"{peer} serves no stage record here: not asking it to lead a gradient round")
        return super().get_stub(p2p, peer, namespace=namespace)

    _weight_caps: tuple[dict[str, float], float] | None = None  # set in the averager's own process

    def set_weight_caps(self, caps: dict[str, float] | None, default: float = float("inf")) -> None:
        """Clamp the weight each group-mate sends with its gradients (DHT peer id, base58 -> most samples it could
        have processed; ``default`` for the others; None: no clamp), for the next round's parts this peer
        reduces. A part's owner reduces it, so a liar's own part is out of reach here; no honest peer's part
        gives it more than its cap."""
        self._outer_pipe.send(("_set_weight_caps", [None if caps is None else (dict(caps), float(default))], {}))

    async def _set_weight_caps(self, caps) -> None:  # runs in the averager's process
        self._weight_caps = caps

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:  # runs in the averager's process
        caps = self._weight_caps
        if caps is not None:
            stream = self._capped(stream, caps[0].get(context.remote_id.to_base58(), caps[1]), context.remote_id)
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    @staticmethod
    async def _capped(stream, cap: float, peer):
        told = False
        async for message in stream:
            weight = message.weight
            if not 0.0 <= weight <= cap:  # also NaN, and a negative weight that would inflate the others'
                if not told:
                    _log_stranger(peer, "clamped the averaging weight of %s: more samples than its signed progress "
                                        "shows, or not a weight at all")
                    told = True
                message.weight = cap if weight > cap else 0.0
            yield message

    def _strangers(self, peer_ids) -> list[str]:
        members = self._members
        return [] if members is None else [p.to_base58() for p in peer_ids if p.to_base58() not in members]

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:  # runs in the averager's process
        """As a leader, turn away a peer that is not a member (it goes on to its next potential leader)."""
        if self._strangers([context.remote_id]):
            _log_stranger(context.remote_id, "turned %s away from a gradient round: no stage record of this stage "
                                              "names it")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        """Refuse a round whose group (assembled by a leader that let anyone in) holds a peer that is not a member:
        the step fails (hivemind retries within its deadline), and the optimizer falls back to local gradients."""
        strangers = self._strangers(group_info.peer_ids)
        if strangers:
            logger.warning("refused a gradient round with %s: no stage record of this stage names them",
                           ", ".join(strangers))
            raise AllreduceException(f"{len(strangers)} peer(s) in the group serve no stage record here")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    def set_target_group_size(self, size: int) -> None:
        """Takes effect for the next matchmaking (the averager's process handles commands in order)."""
        self._outer_pipe.send(("_set_target_group_size", [int(size)], {}))

    async def _set_target_group_size(self, size: int) -> None:  # runs in the averager's process
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size


class StageProgressTracker(ProgressTracker):
    """hivemind's progress tracker, counting only the progress records signed by the stage's replicas.

    hivemind takes the collaboration's epoch from the highest epoch in any progress record and its sample count
    from all of them; a stranger's record (any key may publish under the key) could then make every replica
    resync to an epoch nobody reached, or step on a batch nobody computed. :attr:`allowed` (``() -> set of
    owner subkeys``, set by the stage once it knows its replicas; None: every record counts) keeps the others
    out.
    """

    allowed: Callable[[], set[bytes]] | None = None

    def _parse_swarm_progress_data(self, metadata):
        allowed = self.allowed
        if allowed is not None and isinstance(metadata, dict):
            keep = allowed()
            strangers = [k for k in metadata if k not in keep]
            if strangers:
                logger.debug("%s: ignoring %d progress record(s) of peers that serve no stage here", self.prefix,
                             len(strangers))
                metadata = {k: v for k, v in metadata.items() if k in keep}
        self.reported = reported_samples(metadata)
        return super()._parse_swarm_progress_data(metadata)

    reported: dict[str, tuple[int, int, float]] = {}  # DHT peer id -> (epoch, samples, time) of its counted record

    def weight_caps(self, epoch: int, ceiling: float) -> dict[str, float]:
        """:func:`weight_caps` of the progress records counted at the last fetch."""
        return weight_caps(self.reported, epoch, ceiling, time.time())


MAX_PROGRESS_AGE_S = 10.0  # an older progress record (fetches failing) sets no cap: the batch bound alone applies


def reported_samples(metadata) -> dict[str, tuple[int, int, float]]:
    """DHT peer id (base58) -> (epoch, samples accumulated, time) of each well-formed progress record."""
    reported = {}
    for item in (metadata.values() if isinstance(metadata, dict) else ()):
        try:
            p = LocalTrainingProgress.parse_obj(item.value)
            reported[PeerID(p.peer_id).to_base58()] = (p.epoch, p.samples_accumulated, p.time)
        except Exception:  # noqa: BLE001 - a malformed record counts for nothing (hivemind drops it too)
            continue
    return reported


def weight_caps(reported: dict[str, tuple[int, int, float]], epoch: int, ceiling: float,
                now: float) -> dict[str, float]:
    """Per DHT peer id, the most a round at ``epoch`` may weigh its gradients: twice the samples its signed
    progress record shows at that epoch (a record lags by up to a refresh; at least 1), at most ``ceiling``; none
    from a record written more than :data:`MAX_PROGRESS_AGE_S` ago (the sender may have accumulated since)."""
    return {peer: min(ceiling, 2.0 * max(samples, 1)) for peer, (at, samples, written) in reported.items()
            if at == epoch and now - written <= MAX_PROGRESS_AGE_S}


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
        self._averager_opts = dict(kwargs.get("averager_opts") or {})
        super().__init__(grad_averager_factory=GroupSizedGradientAverager, **kwargs)

    def _make_gradient_averager(self, factory, **kwargs) -> GroupSizedGradientAverager:
        # hivemind 1.1.12 documents averager_opts as going to both averagers but gives them only to the state
        # averager: the gradient averager kept its 3 s request timeout, over our matchmaking time, which hivemind
        # warns can deadlock matchmaking (and printed that warning at every start)
        return super()._make_gradient_averager(factory, **{**self._averager_opts, **kwargs})

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> StageProgressTracker:
        return StageProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                    client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                    **kwargs)

    def _make_state_averager(self, **kwargs) -> StageStateAverager:
        # the arguments hivemind.Optimizer gives its own state averager, with our class
        return StageStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

    def refresh_global_epoch(self) -> None:
        """Read the collaboration's epoch from the progress records now (hivemind does so only inside its step)."""
        self._update_global_epoch(None)

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        assert grad_scaler is None, "stage peers do not use a grad scaler"
        # Rounds are never pre-scheduled here, so a control still held is the last round's, finished; hivemind
        # would take it as a failed pre-scheduled round and skip averaging this time.
        self.scheduled_grads = None
        if not self.together:
            return False  # alone: the local gradients are the stage's gradients
        try:
            # a replica with no samples joins at a tiny weight, not 0: hivemind divides each part's weighted sum
            # by the weights that reached it, so a part that only zero-weight replicas sent (its other sender
            # died mid-round, or every replica in the group was empty) would come out 0/0 = NaN for everyone
            weight = max(float(self.grad_averager.local_samples_accumulated), MIN_ROUND_WEIGHT)
            self.scheduled_grads = self.grad_averager.step(weight=weight, reset_accumulators=True, wait=False)
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
