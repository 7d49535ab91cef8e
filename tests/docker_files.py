"""Reading docker/Dockerfile, docker/*.yaml and .dockerignore the way Docker does, for tests that have no engine.

* :func:`dockerfile` -> :class:`Dockerfile`: instructions with continuation lines joined, and the
  parts tests use (exec-form ENTRYPOINT, HEALTHCHECK command and options, ENV, EXPOSE, ...);
* :func:`compose` -> the YAML of a compose file with anchors and merge keys resolved (PyYAML does both);
* :func:`dockerignored`: whether a path of the build context is left out by .dockerignore patterns;
* :func:`seconds`: a compose/Dockerfile duration (``1m30s``) in seconds.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (KEYWORD, its arguments), in order

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.args(keyword)
        assert found, f"the Dockerfile has no {keyword}"
        return found[-1]

    @property
    def entrypoint(self) -> list[str]:
        return exec_form(self.last("ENTRYPOINT"))

    @property
    def base(self) -> str:
        """The last FROM's image, a ``${ARG}`` there replaced by the default of the ARG declared before it."""
        image = self.last("FROM").split()[0]
        found = re.fullmatch(r"\$\{?(\w+)}?", image)
        if not found:
            return image
        defaults = dict(rest.partition("=")[::2] for kw, rest in self.instructions if kw == "ARG")
        assert defaults.get(found.group(1)), f"FROM {image}: no ARG {found.group(1)} with a default"
        return defaults[found.group(1)]

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(``{"interval": "30s", ...}``, the exec-form command after CMD)."""
        options, _, command = self.last("HEALTHCHECK").partition(" CMD ")
        flags = dict(opt.removeprefix("--").split("=", 1) for opt in options.split())
        return flags, exec_form(command)

    @property
    def env(self) -> dict[str, str]:
        """ENV ``key=value`` pairs (later ones win); values as written (``$PATH`` unexpanded)."""
        out = {}
        for rest in self.args("ENV"):
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                out[key] = value
        return out

    @property
    def exposed(self) -> set[int]:
        return {int(p.split("/")[0]) for rest in self.args("EXPOSE") for p in rest.split()}


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not an exec-form list: {text}"
    return value


def dockerfile(path: Path = DOCKER / "Dockerfile") -> Dockerfile:
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comments, also inside a continued instruction, are not part of it
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return Dockerfile(instructions)


def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_patterns(path: Path = ROOT / ".dockerignore") -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def seconds(duration: str) -> float:
    """``40s``, ``5m``, ``1m30s``, ``500ms`` -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)
