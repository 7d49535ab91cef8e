"""The real image, built from docker/Dockerfile and run with podman, on machines where no Docker engine runs.

* :func:`podman_problem`: why containers cannot be built or run here (``None`` when they can);
* :func:`local_base_image`: a Debian 12 image with Python 3.11 made here with ``debootstrap`` and ``podman import``,
  for the Dockerfile's ``BASE_IMAGE`` where no registry of images is reachable (kept under a tag that names its
  recipe, so it is made once per machine);
* :func:`build_image`: ``podman build`` of docker/Dockerfile on that base, with the host's CA bundle and local
  wheel directories mounted for the build only (the image keeps neither);
* :class:`Container`: one detached container on the host's network (logs, health, exit code, graceful stop).

Podman here needs the ``runc`` runtime (``crun`` fails on this host's cgroups) and explicit ``--ulimit`` values
below the host's hard limits (its defaults fail with "error setting rlimits"). HEALTHCHECK is Docker's, not OCI's:
images are built with ``--format docker`` or podman drops it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
SUITE = "bookworm"  # Debian 12: Python 3.11, the version constraints.txt is tested with
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_IMAGE = f"localhost/swarm-peer-base:{SUITE}-python3-venv"  # the tag names the recipe above
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's ca-certificates bundle


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ...: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def podman_problem() -> str | None:
    """Why the image cannot be built and run on this machine, or ``None``."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install podman runc debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap and rootful podman need root"
    info = subprocess.run([*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                          text=True, timeout=60, check=False)
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-500:]}"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt is configured with here (deb822 ``.sources`` or ``sources.list``), else Debian's CDN."""
    if os.environ.get("SWARM_DEBIAN_MIRROR"):
        return os.environ["SWARM_DEBIAN_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        for stanza in re.split(r"\n\s*\n", text):
            uris, suites = re.search(r"^URIs:\s*(\S+)", stanza, re.M), re.search(r"^Suites:.*", stanza, re.M)
            if uris and suites and re.search(rf"\b{SUITE}\b(?!-)", suites.group(0)):
                return uris.group(1)
        found = re.search(rf"^deb\s+(?:\[[^]]*]\s+)?(\S+)\s+{SUITE}\s", text, re.M)
        if found:
            return found.group(1)
    return DEFAULT_MIRROR


def local_base_image() -> str:
    """:data:`BASE_IMAGE`, made with debootstrap unless this machine has it already (about 1.5 min)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    with tempfile.TemporaryDirectory(prefix="swarm-peer-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs),
                               debian_mirror()], capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([*PODMAN, "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True,
                                  text=True, timeout=600, check=False)
        tar.stdout.close()
        assert tar.wait(60) == 0 and imported.returncode == 0, imported.stderr[-2000:]
    return BASE_IMAGE


def build_mounts(workdir: Path) -> list[str]:
    """``--volume`` options for the build only: the host's CA bundle over the image's (pip reaches the package
    index through this machine's TLS setup) and, with a pip config that names them, the local wheel directories
    of ``PIP_FIND_LINKS`` (the CPU torch wheel lies there; the index would bring the multi-GB CUDA build)."""
    mounts = []
    bundle = os.environ.get("SSL_CERT_FILE") or CA_BUNDLE_IN_IMAGE
    if Path(bundle).is_file():
        mounts += ["--volume", f"{Path(bundle).resolve()}:{CA_BUNDLE_IN_IMAGE}:ro"]
    links = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if Path(p).is_dir()]
    if links:
        inside = [f"/var/tmp/find-links/{i}" for i in range(len(links))]
        for path, target in zip(links, inside, strict=True):
            mounts += ["--volume", f"{path.resolve()}:{target}:ro"]
        conf = workdir / "pip.conf"
        conf.write_text("[global]\nfind-links =\n" + "".join(f"    {t}\n" for t in inside))
        mounts += ["--volume", f"{conf}:/etc/pip.conf:ro"]
    return mounts


def build_image(tag: str, base: str, workdir: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    """``podman build`` of docker/Dockerfile from the repository root with ``BASE_IMAGE=base``; the image ``tag``
    named before is removed once the new one has the tag (each rebuild would otherwise leave ~2 GB behind)."""
    before = image_id(tag)
    proc = subprocess.run([*PODMAN, "build", *LIMITS, "--format", "docker", "--network", "host",
                           "--build-arg", f"BASE_IMAGE={base}", *build_mounts(workdir),
                           "--file", str(ROOT / "docker" / "Dockerfile"), "--tag", tag, str(ROOT)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"podman build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    if before and before != image_id(tag):
        podman("rmi", before, check=False)  # only our own image; still in use by a container: kept
    return proc


def image_id(tag: str) -> str | None:
    proc = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size_mb(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6


class Container:
    """A detached container of ``image`` on the host network, removed with its volumes by :meth:`remove`."""

    def __init__(self, image: str, name: str, args: list[str], env: dict[str, str] | None = None,
                 healthcheck: bool = False):
        self.name = name
        options = [f"--env={k}={v}" for k, v in (env or {}).items()]
        if not healthcheck:
            options.append("--no-healthcheck")  # roles without a gRPC server (as the README says)
        podman("run", "--detach", "--pull", "never", "--name", name, "--network", "host", *LIMITS, *options, image,
               *args)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    @property
    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    @property
    def exit_code(self) -> int:
        return int(self.inspect("{{.State.ExitCode}}"))

    @property
    def health(self) -> str:
        return self.inspect("{{.State.Health.Status}}")

    def run_healthcheck(self) -> bool:
        """``podman healthcheck run``: the image's HEALTHCHECK once; True when it passed."""
        return podman("healthcheck", "run", self.name, timeout=60, check=False).returncode == 0

    def stop(self, grace: float) -> tuple[int, float]:
        """``podman stop -t grace`` (SIGTERM, SIGKILL after ``grace`` s): the exit code and how long it took."""
        start = time.monotonic()
        podman("stop", "--time", str(int(grace)), self.name, timeout=grace + 60)
        return self.exit_code, time.monotonic() - start

    def remove(self) -> None:
        podman("rm", "--force", "--volumes", "--time", "0", self.name, timeout=60, check=False)
