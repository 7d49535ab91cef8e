"""Emulating a slower device (``--compute-slowdown F``, tests and benchmarks).

After a piece of compute, the emulated device stays busy F times as long as the real one needed: the caller idles
for the difference. A sleep yields the CPU, so other processes on the machine are not slowed.

What the real device "needed" is the CPU time of the computing thread when it computes alone in that thread (a
CPU device with one torch thread: forward and backward then run in the caller's thread), else the wall time (a
GPU's asynchronous kernels, or several torch threads). CPU time does not grow while other processes hold the
cores, so on a busy machine an emulated device keeps its speed and the figures describe the emulated world, not
core contention, unless the machine is so busy that the wall time alone exceeds F times the CPU time (then the
device is as slow as the machine, and no idle is added).
"""

from __future__ import annotations

import time

import torch


def counts_cpu_time(device: torch.device | str) -> bool:
    """Whether compute on ``device`` is measured by the calling thread's CPU time (see the module docstring)."""
    return torch.device(device).type == "cpu" and torch.get_num_threads() == 1


def mark() -> tuple[float, float]:
    """The start of a piece of compute: (wall, this thread's CPU) seconds, for :func:`idle_after`."""
    return time.perf_counter(), time.thread_time()


def idle_after(started: tuple[float, float], factor: float, cpu_time: bool = True) -> None:
    """Sleep until the compute begun at ``started`` (a :func:`mark` in this thread) has kept the emulated device
    busy ``factor`` times what it took: this thread's CPU time since then (``cpu_time``) or the wall time. Returns
    at once if ``factor`` <= 1."""
    if factor <= 1.0:
        return
    wall = time.perf_counter() - started[0]
    took = time.thread_time() - started[1] if cpu_time else wall
    time.sleep(max(0.0, factor * took - wall))


def idle_after_compute(device: torch.device, started: tuple[float, float], factor: float) -> None:
    """:func:`idle_after` for compute on ``device`` begun at ``started``: on CUDA it first waits for the kernels
    (the device's time, not the launches'), and it counts CPU time where :func:`counts_cpu_time` says so."""
    if factor <= 1.0:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    idle_after(started, factor, counts_cpu_time(device))
