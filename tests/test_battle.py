"""The battle test's quick scenario end to end (benchmarks/battle.py --quick): real namespaces, links, pipeline,
swarm and baseline processes; the report and its plots are written, and the world is gone afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from links import available, namespaces  # noqa: E402 - benchmarks/ is not a package

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]



@pytest.mark.timeout(480)
def test_quick_battle_writes_the_report_with_its_plots(tmp_path, corpus):
    from matplotlib.image import imread

    before = namespaces()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "battle.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-5000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "battle" and len(summary["scenarios"]) == 1
    wan = summary["scenarios"][0]
    assert wan["scenario"] == "wan" and wan["links_ok"], wan
    systems = wan["systems"]
    assert set(systems) == {"baseline", "pipeline", "swarm"}, systems
    for name, s in systems.items():
        assert "error" not in s, (name, s)
        assert s["tokens_per_s"] > 0 and 0 < s["cpu_utilisation"] <= 1, (name, s)
    assert systems["swarm"]["trainer"]["lost_microbatches"] == 0
    for name in ("pipeline", "swarm"):  # every byte crossed the emulated links: more than the activations alone
        assert systems[name]["wire_bytes_per_token"] > 100, systems[name]
        assert len(systems[name]["compute_fraction"]) == 4, systems[name]
    report = (tmp_path / "report.md").read_text()
    assert "| wan |" in report and "## Links as measured" in report
    for plot in ("tokens_per_s.png", "loss_vs_tokens.png"):
        assert f"]({plot})" in report
        image = imread(tmp_path / plot)
        assert image.shape[0] > 200 and image.shape[1] > 300, (plot, image.shape)
    for system in ("baseline", "pipeline", "swarm"):  # each run keeps its usual metrics and W&B offline run
        run = tmp_path / "wan" / system / "run"
        assert (run / "metrics.jsonl").stat().st_size > 0
        assert any((run / "wandb").glob("offline-run-*")), system
    assert namespaces() == before


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux's setpriv to drop root")
def test_without_root_it_says_so_and_starts_nothing(tmp_path):
    before = namespaces()
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                          str(ROOT / "benchmarks" / "battle.py"), "--quick", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "MPLCONFIGDIR": str(tmp_path)})
    assert out.returncode == 2, out
    assert "emulated links need root" in out.stderr and "run it as root" in out.stderr, out.stderr
    assert namespaces() == before and not (tmp_path / "out").exists()
