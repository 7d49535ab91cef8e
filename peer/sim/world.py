"""The simulated world: device classes, links, and when each peer is there (lifetimes, or a trace file).

Devices are rated by their vendor's peak dense 16-bit tensor throughput (public datasheets), and every device is
assumed to reach the same fraction of it (:data:`DEFAULT_MFU`), so their *relative* speeds are the datasheets'
ratios. That is optimistic for the T4 (whose sustained clocks throttle well below its peak) and the relative figures
are what matter here: T4 1, A10 1.9, A100 4.8, H100 15.2.

A link is a peer's access link: ``mbit_s`` each way (full duplex) and a one-way ``latency_ms`` to the internet's
core; a transfer from A to B runs at the smaller of the two bandwidths and pays both latencies (:mod:`.costs`).

A peer's presence is a list of :class:`PeerSpec` intervals. Scenarios draw them: everyone from the start
(``homogeneous``, ``heterogeneous``), or with exponential lifetimes where each preempted peer is replaced, after an
exponential delay, by a fresh peer of the same kind (``churn``); or a trace file gives them (:func:`load_trace`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
from pathlib import Path
from typing import Sequence

from peer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Device:
    """A GPU class: its peak dense fp16/bf16 tensor throughput from its datasheet (FLOP/s)."""

    name: str
    peak_flops: float
    memory_gb: int
    source: str


DEVICES: dict[str, Device] = {
    "T4": Device("T4", 65e12, 16, "NVIDIA T4 datasheet: 65 TFLOPS mixed-precision (FP16/FP32) tensor"),
    "A10": Device("A10", 125e12, 24, "NVIDIA A10 datasheet: 125 TFLOPS BF16 tensor, dense (250 with sparsity)"),
    "A100": Device("A100", 312e12, 80, "NVIDIA A100 datasheet: 312 TFLOPS BF16 tensor, dense (624 with sparsity)"),
    "H100": Device("H100", 989e12, 80, "NVIDIA H100 SXM datasheet: 989 TFLOPS BF16 tensor, dense (1,979 sparse)"),
}
DEFAULT_MFU = 0.35  # fraction of the peak a training step reaches on every device class


@dataclasses.dataclass(frozen=True)
class Link:
    """A peer's access link: bandwidth each way and one-way latency to the core."""

    mbit_s: float
    latency_ms: float

    @property
    def bytes_per_s(self) -> float:
        return self.mbit_s * 1e6 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3


WAN = Link(100, 25)  # the battle test's wan scenario
UNEVEN_LINKS = (Link(1000, 5), Link(200, 20), Link(50, 50))  # the battle test's uneven-links choices


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """One stay of one peer: which device, which link, from when to when (simulated seconds; ``inf``: stays)."""

    peer_id: str
    device: str
    link: Link
    join_s: float
    leave_s: float = math.inf


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """How a scenario draws its peers."""

    devices: dict[str, float]  # device class -> share of the peers
    links: tuple[tuple[Link, float], ...]  # (link, share)
    preemptions_per_hour: float = 0.0  # each peer's hazard of being preempted
    replace_after_s: float = 300.0  # mean delay before a preempted peer's replacement joins
    mfu: float = DEFAULT_MFU

    def draw(self, rng: random.Random) -> tuple[str, Link]:
        device = rng.choices(list(self.devices), weights=list(self.devices.values()))[0]
        link = rng.choices([lk for lk, _ in self.links], weights=[w for _, w in self.links])[0]
        return device, link


# a volunteer pool: mostly older and mid-range GPUs, on home, office and datacenter links
HETEROGENEOUS_DEVICES = {"T4": 0.5, "A10": 0.3, "A100": 0.15, "H100": 0.05}
SCENARIOS: dict[str, WorldSpec] = {
    "homogeneous": WorldSpec({"T4": 1.0}, ((WAN, 1.0),)),
    "heterogeneous": WorldSpec(HETEROGENEOUS_DEVICES, tuple((lk, 1.0) for lk in UNEVEN_LINKS)),
    "churn": WorldSpec(HETEROGENEOUS_DEVICES, tuple((lk, 1.0) for lk in UNEVEN_LINKS), preemptions_per_hour=0.2),
}


def draw_peers(world: WorldSpec, count: int, duration_s: float, rng: random.Random) -> list[PeerSpec]:
    """``count`` peers from the start; with preemptions, each one's lifetime is exponential and its replacement (same
    device and link) joins an exponential delay later, itself with an exponential lifetime, until ``duration_s``."""
    out = []
    for n in range(count):
        device, link = world.draw(rng)
        start, generation = 0.0, 0
        while start < duration_s:
            life = rng.expovariate(world.preemptions_per_hour / 3600) if world.preemptions_per_hour > 0 else math.inf
            out.append(PeerSpec(f"p{n}.{generation}", device, link, start, start + life))
            start += life + rng.expovariate(1 / world.replace_after_s)
            generation += 1
    return out


TRACE_COLUMNS = ("peer", "device", "join_s", "leave_s", "mbit_s", "latency_ms")
MAX_TRACE_BYTES = 64 * 2**20
MAX_TRACE_ROWS = 200_000


def load_trace(path: Path, default_link: Link = WAN) -> list[PeerSpec]:
    """Peers' stays from a CSV trace (the format is in the README's Simulator section).

    Header ``peer,device,join_s,leave_s`` and optionally ``mbit_s,latency_ms``; one row per stay. ``leave_s`` empty
    means the peer stays to the end; a peer id may appear in several rows whose stays do not overlap.

    :raises ConfigError: naming the file, the line and what is wrong, for anything but a well-formed trace
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ConfigError(f"trace {path}: cannot read it ({e.strerror or e})") from None
    if size > MAX_TRACE_BYTES:
        raise ConfigError(f"trace {path}: {size} bytes, more than the {MAX_TRACE_BYTES} a trace may have")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"trace {path}: cannot read it as UTF-8 text ({e})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0][:4]] != list(TRACE_COLUMNS[:4]):
        raise ConfigError(f"trace {path}: the first line must be the header {','.join(TRACE_COLUMNS[:4])}"
                          f"[,mbit_s,latency_ms]")
    header = [c.strip() for c in rows[0]]
    if header not in (list(TRACE_COLUMNS[:4]), list(TRACE_COLUMNS)):
        raise ConfigError(f"trace {path}: unknown columns {header}; expected {','.join(TRACE_COLUMNS)}")
    if len(rows) - 1 > MAX_TRACE_ROWS:
        raise ConfigError(f"trace {path}: {len(rows) - 1} rows, more than {MAX_TRACE_ROWS}")
    specs = [_trace_row(path, line, row, header, default_link) for line, row in enumerate(rows[1:], start=2)
             if any(c.strip() for c in row)]
    if not specs:
        raise ConfigError(f"trace {path}: no peers (only a header)")
    _check_overlaps(path, specs)
    return specs


def _number(path: Path, line: int, name: str, value: str, low: float, allow_inf: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"trace {path} line {line}: {name} {value!r} is not a number") from None
    if math.isnan(x) or x < low or (math.isinf(x) and not allow_inf):
        raise ConfigError(f"trace {path} line {line}: {name} {value!r} must be a finite number >= {low:g}")
    return x


def _trace_row(path: Path, line: int, row: Sequence[str], header: list[str], default_link: Link) -> PeerSpec:
    if len(row) != len(header):
        raise ConfigError(f"trace {path} line {line}: {len(row)} fields, the header has {len(header)}")
    cells = dict(zip(header, (c.strip() for c in row), strict=True))
    peer = cells["peer"]
    if not peer or len(peer) > 128:
        raise ConfigError(f"trace {path} line {line}: a peer id must have 1 to 128 characters")
    if cells["device"] not in DEVICES:
        raise ConfigError(f"trace {path} line {line}: unknown device {cells['device']!r}; "
                          f"use one of {', '.join(DEVICES)}")
    join = _number(path, line, "join_s", cells["join_s"], 0.0)
    leave = _number(path, line, "leave_s", cells["leave_s"], 0.0, allow_inf=True) if cells["leave_s"] else math.inf
    if leave <= join:
        raise ConfigError(f"trace {path} line {line}: leave_s {leave:g} is not after join_s {join:g}")
    link = default_link
    if "mbit_s" in cells:
        link = Link(_number(path, line, "mbit_s", cells["mbit_s"], 1e-3),
                    _number(path, line, "latency_ms", cells["latency_ms"], 0.0))
        if link.mbit_s > 1e6 or link.latency_ms > 1e5:
            raise ConfigError(f"trace {path} line {line}: a link of at most 1e6 Mbit/s and 1e5 ms, please")
    return PeerSpec(peer, cells["device"], link, join, leave)


def _check_overlaps(path: Path, specs: list[PeerSpec]) -> None:
    by_peer: dict[str, list[PeerSpec]] = {}
    for s in specs:
        by_peer.setdefault(s.peer_id, []).append(s)
    for peer, stays in by_peer.items():
        stays.sort(key=lambda s: s.join_s)
        for a, b in zip(stays, stays[1:], strict=False):
            if b.join_s < a.leave_s:
                raise ConfigError(f"trace {path}: peer {peer!r} joins at {b.join_s:g} s before its stay from "
                                  f"{a.join_s:g} s has ended ({a.leave_s:g} s)")
