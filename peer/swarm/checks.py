"""Checked results: a trainer sends a few of its microbatches along a second route and compares the losses.

Nothing proves that a stage computed what it answered: a peer that announces a high
throughput, answers at once and makes up the loss would look healthy (0 lost microbatches)
while the trainer's tokens go nowhere useful. So, after a training microbatch comes back, a
trainer sends the same microbatch again, forward only, with every address of the first
route in the header's ``avoid`` list: each stage routes it around those peers while it has
another choice. When the losses differ by more than the tolerance, a third route that
avoids both decides. The odd route is the one that disagrees with the other two while
those two agree and ran every stage at the same optimizer epoch. An update between the
routes changes the loss honestly, so an odd route whose stages all report known epochs
other than the agreeing pair's is excused (inconclusive); one that reports the same epochs,
an unknown one (-1) or a different number of stages is caught. Its peers that are on
neither agreeing route become suspects. The trainer routes around suspects from then on
(every later microbatch carries them in ``avoid``, so every stage skips them for this
trainer while it has other peers) and reports them.

Limits, said plainly: a route is what the stages report (each names the next stage's peer
it called), so a liar at stage k can name innocent peers after it, and they become suspects
too (bounded: once per caught lie, and only in this trainer's routing). A liar that answers
forward-only requests honestly and lies only on training hops is not caught by this, nor
is one that reports plausible epochs other than its stage-mates' (it passes for an update
in between). With a single peer at some stage the routes share it, and it can be neither
checked nor blamed.

The comparison functions are pure (standard library only); :class:`ResultChecker` drives
them with the trainer's own hop function.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Awaitable, Callable, Sequence

logger = logging.getLogger("peer.train")
MAX_SUSPECTS = 32  # addresses a trainer routes around (the header's avoid list takes 64)


@dataclasses.dataclass(frozen=True)
class Route:
    """One microbatch's way through the stages, as the stages reported it."""

    loss: float
    endpoints: tuple[str, ...]  # stage 0's address (dialed by the trainer), then each next stage's, as reported
    epochs: tuple[int, ...]  # each stage's optimizer epoch at its forward (-1: unknown)


def comparable(a: Route, b: Route) -> bool:
    """Both routes ran every stage at the same, known epoch."""
    return len(a.epochs) == len(b.epochs) and all(x == y and x >= 0 for x, y in zip(a.epochs, b.epochs, strict=True))


def agree(a: Route, b: Route, tolerance: float) -> bool:
    """The losses differ by at most ``tolerance`` relative (of their mean, at least 1 nat); NaN never agrees."""
    scale = max(1.0, (abs(a.loss) + abs(b.loss)) / 2)
    return math.isfinite(a.loss) and math.isfinite(b.loss) and abs(a.loss - b.loss) <= tolerance * scale


def odd_route(routes: Sequence[Route], tolerance: float) -> tuple[Route, Route] | None:
    """Of three routes, the one whose loss disagrees with the other two while those agree at the same epochs, and
    one of the two; None if there is no such route."""
    for i, route in enumerate(routes):
        a, b = (r for j, r in enumerate(routes) if j != i)
        if comparable(a, b) and agree(a, b, tolerance) and not agree(route, a, tolerance) \
                and not agree(route, b, tolerance):
            return route, a
    return None


def excused(odd: Route, reference: Route) -> bool:
    """The odd route ran at other, known epochs than the agreeing ones: an update came in between."""
    return len(odd.epochs) == len(reference.epochs) and min(odd.epochs, default=-1) >= 0 \
        and odd.epochs != reference.epochs


def suspects(odd: Route, others: Sequence[Route]) -> set[str]:
    """The odd route's addresses that no other route went through."""
    honest = {e for r in others for e in r.endpoints}
    return {e for e in odd.endpoints if e and e not in honest}


class ResultChecker:
    """A trainer's checks: which microbatches to check, the verdicts, and the peers it no longer trusts.

    :param fraction: share of training microbatches checked (0: none)
    :param tolerance: relative loss difference two routes may show (see :func:`agree`)
    """

    def __init__(self, fraction: float, tolerance: float, seed: int = 0):
        self.fraction, self.tolerance = fraction, tolerance
        self.rng = random.Random(seed)
        self.counters = {"checks": 0, "agreed": 0, "inconclusive": 0, "mismatch": 0, "caught": 0}
        self.distrusted: dict[str, float] = {}  # address -> the odd loss that named it (in the order found)

    def due(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    @property
    def avoid(self) -> frozenset[str]:
        """Addresses to route around before any other: those a check caught."""
        return frozenset(self.distrusted)

    async def check(self, primary: Route, again: Callable[[frozenset[str]], Awaitable[Route | None]]) -> str:
        """Compare ``primary`` with a second route (and a third when they differ); returns the verdict, one of
        ``agreed``, ``inconclusive``, ``mismatch`` (no route was the odd one) or ``caught``.

        :param again: ``(avoid) -> Route``: the same microbatch, forward only, around ``avoid`` and (before it)
            :attr:`avoid` (None: stopped)
        """
        self.counters["checks"] += 1
        check = await again(frozenset(primary.endpoints))
        if check is None:
            return self._verdict("inconclusive")
        if agree(primary, check, self.tolerance):
            return self._verdict("agreed")
        decider = await again(frozenset(primary.endpoints) | frozenset(check.endpoints))
        if decider is None:
            return self._verdict("inconclusive")
        routes = (primary, check, decider)
        found = odd_route(routes, self.tolerance)
        if found is None:
            logger.warning("checked result: losses %s disagree with no two agreeing at the same epochs",
                           ", ".join(f"{r.loss:.4f} (epochs {list(r.epochs)})" for r in routes))
            return self._verdict("mismatch")
        odd, reference = found
        if excused(odd, reference):
            return self._verdict("inconclusive")
        blamed = suspects(odd, [r for r in routes if r is not odd])
        for address in sorted(blamed):
            if len(self.distrusted) < MAX_SUSPECTS:
                self.distrusted.setdefault(address, odd.loss)
        logger.warning("checked result: the route through %s answered loss %.4f where two others agree on %.4f at "
                       "epochs %s; routing around %s from now on", " -> ".join(odd.endpoints), odd.loss,
                       reference.loss, list(reference.epochs), ", ".join(sorted(blamed)) or "nobody")
        return self._verdict("caught")

    def _verdict(self, verdict: str) -> str:
        self.counters[verdict] += 1
        return verdict
