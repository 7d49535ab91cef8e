"""A simulation's outputs: ``result.json`` and four plots (throughput over time, utilisation per stage, peers per
stage, moves) in the run directory, and the summary the command prints. The plots need matplotlib (the ``dev``
extra); without it the command writes the JSON and says so."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

PLOTS = ("throughput.png", "utilisation.png", "peers.png", "moves.png")


def summary(result: dict, wall_s: float) -> dict:
    """The figures the command prints: tokens/s of each system and its fraction of the oracle."""
    out = {"scenario": result.get("scenario"), "peers": result["peers"], "stages": result["stages"],
           "duration_s": result["duration_s"], "oracle_tokens_per_s": round(result["oracle"]["tokens_per_s"], 1)}
    for name, s in result["systems"].items():
        mb = s["microbatches"]
        out[f"{name}_tokens_per_s"] = round(s["tokens_per_s"], 1)
        out[f"{name}_of_oracle"] = round(s["fraction_of_oracle"], 3)
        out[f"{name}_retried_lost"] = f"{mb['retried']}/{mb['lost']}"
        if name == "swarm":
            out["swarm_moves"] = len(s["moves"])
    out["wall_s"] = round(wall_s, 2)
    return out


def write(result: dict, out: Path) -> list[Path]:
    """``result.json`` and the plots into ``out`` (created); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "result.json"]
    kept = result | {"systems": {name: {k: v for k, v in s.items() if k != "done_at"}  # every completion: too long
                                 for name, s in result["systems"].items()}}
    files[0].write_text(json.dumps(kept, indent=1, default=_jsonable))
    try:
        import matplotlib  # a heavy import, and only in the `dev` extra: plots are optional
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): wrote %s without plots", files[0])
        return files
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    systems = result["systems"]
    stages = result["stages"]
    minutes = lambda rows: [r["t"] / 60 for r in rows]  # noqa: E731

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, s in systems.items():
        ax.plot(minutes(s["timeline"]), [r["tokens_per_s"] for r in s["timeline"]], label=name)
    oracle = result["oracle"]["timeline"]
    ax.plot(minutes(oracle), [r["tokens_per_s"] for r in oracle], "k--", label="oracle (best static assignment)")
    _finish(ax, "tokens/s", f"throughput over time ({result['peers']} peers, {stages} stages)")
    files.append(_save(fig, plt, out / "throughput.png"))

    for field, label, name in (("utilisation", "compute busy fraction", "utilisation.png"),
                               ("peers", "online peers", "peers.png")):  # one panel per system, a line per stage
        fig, axes = plt.subplots(1, len(systems), figsize=(4 * len(systems), 3.8), squeeze=False, sharey=True)
        for ax, (system, s) in zip(axes[0], systems.items(), strict=True):
            for k in range(stages):
                ax.plot(minutes(s["timeline"]), [r[field][k] for r in s["timeline"]], label=f"stage {k}")
            _finish(ax, label, system)
        files.append(_save(fig, plt, out / name))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, s in systems.items():
        times = sorted(m["t"] / 60 for m in s["moves"])
        ax.step([0, *times, result["duration_s"] / 60], [0, *range(1, len(times) + 1), len(times)], where="post",
                label=f"{name} ({len(times)} moves)")
    _finish(ax, "moves so far", "rebalancing moves (one peer to another stage)")
    files.append(_save(fig, plt, out / "moves.png"))
    return files


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("simulated minutes")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
