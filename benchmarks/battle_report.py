"""The battle test's report: ``report.md`` with its tables and PNG plots (matplotlib), from the scenarios' results."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

SEQ_LEN = 128  # the data's default sequence length: tokens per sample
SMOOTH_S = 20.0  # seconds over which the utilisation plot averages the trainer's rate
TARGETS = {"wan_swarm_over_pipeline": 1.5, "churn_kept": 0.8, "rebalancing_gain": 1.3,
           "rebalancing_gain_after_moves": 1.3}


def loss_at(curve: list, tokens: float) -> float | None:
    """Mean loss of the (up to) three logged steps ending at the last one at or before ``tokens``."""
    before = [loss for t, loss in curve if t <= tokens]
    return round(statistics.fmean(before[-3:]), 4) if before else None


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def _tps(result: dict, system: str):
    return (result["systems"].get(system) or {}).get("tokens_per_s")


def headline(results: list[dict]) -> dict:
    """The issue's targets, measured."""
    by = {r["scenario"]: r for r in results if r.get("links_ok")}
    out = {}
    if "wan" in by:
        out["wan_swarm_over_pipeline"] = ratio(_tps(by["wan"], "swarm"), _tps(by["wan"], "pipeline"))
    if "churn" in by:
        base = by.get("wan")
        out["churn_kept"] = ratio(_tps(by["churn"], "swarm"), _tps(base, "swarm")) if base else None
        out["churn_pipeline_kept"] = ratio(_tps(by["churn"], "pipeline"), _tps(base, "pipeline")) if base else None
        out["churn_lost_microbatches"] = (by["churn"]["systems"].get("swarm", {}).get("trainer") or {}).get(
            "lost_microbatches")
    if "uneven-compute" in by:
        r = by["uneven-compute"]
        out["rebalancing_gain"] = ratio(_tps(r, "swarm-rebalancing"), _tps(r, "swarm-static"))
        after = r["systems"].get("swarm-rebalancing", {}).get("tokens_per_s_after_moves")
        out["rebalancing_gain_after_moves"] = ratio(after, _tps(r, "swarm-static"))
    return out


def _bar_tokens(results: list[dict], path: Path) -> None:
    rows = [r for r in results if r.get("links_ok") and r["scenario"] not in ("square-cube", "compression")]
    if not rows:
        return
    systems = sorted({s for r in rows for s in r["systems"]}, key=lambda s: (s != "baseline", s))
    fig, ax = plt.subplots(figsize=(10.5, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [_tps(r, system) or 0 for r in rows], width, label=system)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["scenario"] for r in rows])
    ax.set_ylabel("tokens/s (emulated devices)")
    ax.set_title("Throughput per system per scenario (4 emulated devices; baseline: 1)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_curves(results: list[dict], path: Path) -> None:
    rows = [r for r in results if r.get("links_ok") and r["scenario"] != "square-cube"]
    if not rows:
        return
    cols = min(3, len(rows))
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(4.5 * cols, 3.2 * ((len(rows) + 2) // 3)),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):  # more axes than rows
        for system, s in sorted(r["systems"].items()):
            if s.get("curve"):
                ax.plot([t for t, _ in s["curve"]], [loss for _, loss in s["curve"]], label=system, lw=1)
        ax.set_title(r["scenario"], fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stages_over_time(result: dict, path: Path) -> None:
    """Per stage over time, from the trainer's step records: peers, capacity (the sum of its peers' throughput) and
    utilisation (the trainer's samples/s over that capacity)."""
    swarms = [(name, s) for name, s in sorted(result["systems"].items()) if s.get("timeline")]
    if not swarms:
        return
    fig, axes = plt.subplots(3, len(swarms), figsize=(5 * len(swarms), 8), squeeze=False, sharex="col")
    for col, (name, s) in enumerate(swarms):
        timeline = [p for p in s["timeline"] if p.get("peers") and p.get("capacity")]
        t = [p["t"] for p in timeline]
        for k in range(len(timeline[0]["peers"]) if timeline else 0):
            axes[0][col].step(t, [p["peers"][k] for p in timeline], where="post", label=f"stage {k}")
            axes[1][col].plot(t, [p["capacity"][k] for p in timeline], marker=".", label=f"stage {k}")
            # demand: the samples the trainer completed over the last SMOOTH_S seconds or more (the swarm's steps
            # end in bursts), per second, over the capacity
            points = [(b["t"], (b["tokens"] - a["tokens"]) / SEQ_LEN / (b["t"] - a["t"]) / b["capacity"][k])
                      for b in timeline if b["capacity"][k]
                      for a in [max((a for a in timeline if a["t"] <= b["t"] - SMOOTH_S), key=lambda a: a["t"],
                                    default=None)] if a]
            axes[2][col].plot([x for x, _ in points], [u for _, u in points], marker=".", label=f"stage {k}")
        axes[0][col].set_title(f"{name}: peers per stage (at the trainer's steps)", fontsize=9)
        axes[0][col].yaxis.get_major_locator().set_params(integer=True)
        axes[1][col].set_title(f"{name}: capacity (samples/s)", fontsize=9)
        axes[2][col].set_title(f"{name}: utilisation (trainer's samples/s / capacity)", fontsize=9)
        axes[2][col].set_xlabel("seconds since the first step")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _codecs(result: dict, path: Path) -> None:
    names = [n for n in result["systems"] if result["systems"][n].get("wire_bytes_per_token")]
    if not names:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(names, [result["systems"][n]["wire_bytes_per_token"] for n in names])
    a.set_ylabel("bytes on the wire per token")
    b.bar(names, [result["systems"][n].get("tokens_per_s") or 0 for n in names])
    b.set_ylabel("tokens/s")
    fig.suptitle("Compression at WAN links (every byte the router forwarded: activations, DHT, averaging)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _square_cube(result: dict, path: Path) -> list[dict]:
    rows = []
    for name, s in result["systems"].items():
        system, width = name.rsplit("-h", 1)
        if s.get("compute_fraction"):
            rows.append({"system": system, "hidden": int(width), "compute": statistics.fmean(s["compute_fraction"]),
                         "tokens_per_s": s.get("tokens_per_s")})
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for system in sorted({r["system"] for r in rows}):
            mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["hidden"])
            ax.plot([r["hidden"] for r in mine], [1 - r["compute"] for r in mine], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size")
        ax.set_ylabel("fraction of device time not computing")
        ax.set_title("Square-cube at 100 Mbit/s, 25 ms", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return rows


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _tokens_table(results: list[dict]) -> list[str]:
    lines = ["## Tokens/s", "", "| scenario | links | baseline | pipeline | swarm | swarm / pipeline | CPU busy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r["scenario"] in ("square-cube", "compression"):
            continue
        if not r.get("links_ok"):
            lines.append(f"| {r['scenario']} | off by > 10% | - | - | - | - | - |")
            continue
        swarm = [n for n in r["systems"] if n.startswith("swarm")]
        swarm_cell = ", ".join(f"{n.removeprefix('swarm-') if n != 'swarm' else ''} {_fmt(_tps(r, n))}".strip()
                               for n in swarm)
        cpu = max((s.get("cpu_utilisation") or 0) for s in r["systems"].values())
        links = ", ".join(sorted(set(r["links"].values())))
        lines.append(f"| {r['scenario']} | {links} | {_fmt(_tps(r, 'baseline'))} | {_fmt(_tps(r, 'pipeline'))} | "
                     f"{swarm_cell} | {_fmt(ratio(_tps(r, swarm[0]) if swarm else None, _tps(r, 'pipeline')), 2)} | "
                     f"{cpu:.0%} |")
    return lines + ["", "CPU busy: the highest share of this machine's cores in use while a system of the scenario "
                    "was measured (from /proc/stat).", ""]


def _uneven_compute(r: dict, out: Path) -> list[str]:
    _stages_over_time(r, out / "uneven_compute_stages.png")
    rebalancing = r["systems"].get("swarm-rebalancing", {})
    moves = rebalancing.get("moves", [])
    done = ", ".join(f"{m.get('from')}->{m.get('to')} ({m.get('took_s')} s)" for m in moves) or "none"
    if rebalancing.get("tokens_per_s_after_moves"):
        done += (f"; moves done {rebalancing['moves_done_s']} s into the window, then "
                 f"{rebalancing['tokens_per_s_after_moves']:,.0f} tokens/s")
    return ["## Uneven compute", "", f"Slowdowns {r['slowdowns']}; the swarm starts crowded: d0, d1, d2 in stage 0, "
            f"d3 alone in stage 1; the pipeline has the fastest devices on its costliest stages. Moves with "
            f"rebalancing: {len(moves)} ({done}).", "", "![stages](uneven_compute_stages.png)", ""]


def _churn(r: dict) -> list[str]:
    lines = ["## Churn", ""]
    for n, s in r["systems"].items():
        if s.get("events") is not None:
            lines.append(f"- {n}: {_fmt(s.get('tokens_per_s'))} tokens/s over the window; events {s['events']}; "
                         f"trainer {s.get('trainer', {})}")
    return lines + [""]


def _compression(r: dict, out: Path) -> list[str]:
    _codecs(r, out / "codecs.png")
    curves = {n: s.get("curve") or [] for n, s in r["systems"].items()}
    equal = min((c[-1][0] for c in curves.values() if c), default=0)
    lines = ["## Compression (WAN links)", "", "| codec | tokens/s | bytes on the wire per token | "
             f"loss at {equal:,} tokens |", "| --- | --- | --- | --- |"]
    for n, s in r["systems"].items():
        lines.append(f"| {n.removeprefix('swarm-')} | {_fmt(s.get('tokens_per_s'))} | "
                     f"{_fmt(s.get('wire_bytes_per_token'))} | {_fmt(loss_at(curves[n], equal), 4)} |")
    return lines + ["", "![codecs](codecs.png)", ""]


def _square_cube_section(r: dict, out: Path) -> list[str]:
    rows = _square_cube(r, out / "square_cube.png")
    lines = ["## Square-cube (WAN links)", "", "| system | hidden | device time computing | tokens/s |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {x['system']} | {x['hidden']} | {x['compute']:.0%} | {_fmt(x['tokens_per_s'])} |"
              for x in sorted(rows, key=lambda x: (x["system"], x["hidden"]))]
    return lines + ["", "The rest of a device's time is spent waiting: for activations and gradients on the links, "
                    "for averaging (swarm), and in the schedule's bubble (pipeline).", "",
                    "![square-cube](square_cube.png)", ""]


def _links_table(results: list[dict]) -> list[str]:
    lines = ["## Links as measured", "", "| scenario | from | to | RTT asked / measured (ms) | "
             "Mbit/s asked / measured |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for c in r.get("link_checks", []):
            lines.append(f"| {r['scenario']} | {c['from']} | {c['to']} | {c['asked']['rtt_ms']:g} / "
                         f"{c['measured']['rtt_ms']:.1f} | {c['asked']['mbit_s'] or 'unlimited'} / "
                         f"{c['measured']['mbit_s']:.0f} |")
    return lines


SECTIONS = {"uneven-compute": _uneven_compute, "compression": _compression, "square-cube": _square_cube_section}


def write_report(results: list[dict], out: Path) -> Path:
    """Write ``out/report.md`` and its plots; returns the report's path."""
    lines = ["# Battle test", "", "Generated by `benchmarks/battle.py`. Four emulated devices per system (the "
             "baseline: one); every device `--compute-slowdown`ed so that they need well under this machine's "
             "cores; links emulated by network namespaces and a userspace router.", ""]
    heads = headline(results)
    if heads:
        lines += ["## Targets", "", "| figure | measured | target |", "| --- | --- | --- |"]
        for k, v in heads.items():
            target = f">= {TARGETS[k]}" if k in TARGETS else "0" if "lost" in k else "-"
            lines.append(f"| {k} | {v if v is not None else '-'} | {target} |")
        lines.append("")
    lines += _tokens_table(results)
    _bar_tokens(results, out / "tokens_per_s.png")
    _loss_curves(results, out / "loss_vs_tokens.png")
    lines += [f"![{p.stem}]({p.name})\n" for p in (out / "tokens_per_s.png", out / "loss_vs_tokens.png") if p.exists()]
    for r in (r for r in results if r.get("links_ok")):
        errors = [f"- {n}: `{s['error'][:400]}`" for n, s in r["systems"].items() if s.get("error")]
        if errors:
            lines += [f"### {r['scenario']}: failed runs", "", *errors, ""]
        if r["scenario"] in SECTIONS:
            lines += SECTIONS[r["scenario"]](r, out)
        elif r["scenario"] == "churn":
            lines += _churn(r)
    path = out / "report.md"
    path.write_text("\n".join(lines + _links_table(results)) + "\n")
    return path
