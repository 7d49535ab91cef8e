"""The package as users install it: `python -m build` makes an sdist and a wheel, the wheel holds every package
and data file of the source tree, and the wheel installed into a fresh venv outside the checkout (non-editable,
with constraints.txt) runs a short `swarm-peer demo` from a directory that is not the checkout.

The editable install that `make` uses hides a missing package (``peer/swarm`` once had no ``__init__.py`` and
fell out of the wheel while every other test passed), so these tests look at the built files, not at the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from peer import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOTS = ("peer", "dht")  # the top-level packages setup.cfg ships
PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md")  # what an sdist needs to build the wheel again


def source_files() -> set[str]:
    """Every file under the package roots that a build picks up: git's tracked and not-ignored files of the
    checkout (the tree itself, without caches, where git cannot say), as ``peer/data/corpus.py``-style paths."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                                 *PACKAGE_ROOTS], cwd=ROOT, capture_output=True, check=True, timeout=30).stdout.decode()
        return {path for path in listed.split("\0") if path}
    except (OSError, subprocess.CalledProcessError):
        return {path.relative_to(ROOT).as_posix() for root in PACKAGE_ROOTS for path in (ROOT / root).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts}


def module_dirs(files: set[str]) -> set[str]:
    """Directories that hold Python modules: each must be a package, or its modules are not installed."""
    return {path.rsplit("/", 1)[0] for path in files if path.endswith(".py")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``{"wheel": ..., "sdist": ...}`` built from the checkout by `python -m build`, as a release would be."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel], [sdist] = out.glob("*.whl"), out.glob("*.tar.gz")
    assert wheel.name.startswith(f"swarm_peer-{__version__}-py3-none-any"), wheel.name
    return {"wheel": wheel, "sdist": sdist}


def test_every_directory_with_modules_is_a_package(tmp_path):
    files = source_files()
    assert "peer/cli.py" in files and "dht/node.py" in files, sorted(files)[:20]
    missing = sorted(d for d in module_dirs(files) if f"{d}/__init__.py" not in files)
    assert not missing, f"directories with modules but no __init__.py (left out of the wheel): {missing}"


def test_the_wheel_holds_every_source_file(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
    shipped = {name for name in names if name.split("/", 1)[0] in PACKAGE_ROOTS}
    files = source_files()
    assert not files - shipped, f"in the source tree but not in the wheel: {sorted(files - shipped)}"
    assert not shipped - files, f"in the wheel but not in the source tree: {sorted(shipped - files)}"
    for package in module_dirs(files):  # the failure that once shipped: a whole package missing
        assert f"{package}/__init__.py" in names, package
    for data in ("peer/data/shakespeare.jsonl.xz", "peer/data/ATTRIBUTION.md"):  # the embedded corpus
        assert data in names, data
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        assert "swarm-peer = peer.cli:main" in wheel.read(entry_points).decode()


def test_the_sdist_holds_what_rebuilds_the_wheel(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    wanted = source_files() | set(PROJECT_FILES)
    assert not wanted - names, f"not in the sdist: {sorted(wanted - names)}"


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of a user who activated ``venv``: its bin first, nothing of the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_installed_wheel_runs_a_demo_outside_the_checkout(dist, tmp_path):
    venv, home = tmp_path / "venv", tmp_path / "user"
    home.mkdir()
    assert not home.resolve().is_relative_to(ROOT)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, env = venv / "bin" / "python", venv_env(venv)
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                              str(dist["wheel"])], capture_output=True, text=True, env=env, cwd=home, timeout=900,
                             check=False)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    def run(*args: str, timeout: float = 120) -> str:
        proc = subprocess.run([*args], capture_output=True, text=True, env=env, cwd=home, timeout=timeout,
                              check=False)
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = json.loads(run(str(python), "-c", "import json, dht, peer, peer.swarm.trainer, peer.stage.peer; "
                                               "print(json.dumps([peer.__file__, dht.__file__]))"))
    site = venv / "lib"
    assert all(Path(path).resolve().is_relative_to(site.resolve()) for path in where), where  # not the checkout's
    assert run("swarm-peer", "--version").strip() == f"swarm-peer {__version__}"

    out = run("swarm-peer", "demo", "--preset", "tiny", "--max-steps", "2", "--peers-per-stage", "1",
              "--batch-size", "8", "--microbatch-size", "2", "--eval-interval", "0", "--run-dir", "demo", "--json",
              timeout=600)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == [2], summary
    assert (home / "demo" / "logs").is_dir()
