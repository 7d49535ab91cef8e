"""The direction of imports (``../shared/DESIGN.md``, Layout): lower layers never import upper ones.

Every import counts, also one inside a function: a lazy import still ties the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("peer.cli", "peer.commands", "peer.demo", "peer.baseline", "peer.pipeline", "peer.stage", "peer.swarm")
RULES = [  # (modules, prefixes they must not import, why)
    ("dht", ("peer",), "the control plane knows nothing of the runtime"),
    ("peer.rpc", (*UPPER, "peer.model", "peer.partition", "peer.data", "peer.training"),
     "the data plane knows no model"),
    ("peer.swarm.routing", ("peer", "dht", "torch", "hivemind", "grpc"), "a pure policy: the standard library only"),
    ("peer.config", (*UPPER, "peer.rpc", "peer.training", "dht", "torch"), "config sits below everything"),
    ("peer.processes", ("peer.", "dht", "torch", "hivemind"), "process control is standard library only"),
    ("peer.limits", ("peer.", "dht", "torch"), "a module of constants"),
    ("peer.slowdown", ("peer.", "dht", "hivemind"), "the trainers' slower device: torch and the standard library"),
    ("peer.stage", ("peer.cli", "peer.commands", "peer.demo", "peer.swarm.trainer", "peer.pipeline", "peer.baseline"),
     "a stage peer uses the swarm's routing, directory and session, never the trainer"),
    ("peer.swarm", ("peer.stage", "peer.cli", "peer.commands", "peer.demo", "peer.pipeline", "peer.baseline"),
     "the trainer and the routing never import a stage peer"),
    ("peer.pipeline", ("peer.cli", "peer.commands", "peer.demo", "peer.stage", "peer.swarm"),
     "the pipeline baseline stands alone"),
    ("peer.demo", ("peer.cli", "peer.commands", "peer.stage", "peer.swarm"), "the demo starts commands as processes"),
    ("peer.shapes", ("peer.", "dht", "torch", "transformers"), "presets and stage costs: the standard library only"),
    ("peer.sim", (*UPPER[:5], "peer.stage", "peer.swarm.trainer", "peer.swarm.directory", "peer.model",
                  "peer.partition", "peer.rpc", "dht", "torch", "hivemind", "grpc"),
     "the simulator runs the peers' pure policies alone: no runtime, no network, no torch"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from peer import cli`
    return found


def matches(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


MODULES = {module_name(p): p for package in ("peer", "dht") for p in (ROOT / package).rglob("*.py")}


@pytest.mark.parametrize("layer, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_imports_run_downwards(layer, forbidden, why):
    checked = [name for name in MODULES if matches(name, layer)]
    assert checked, f"no module matches {layer}: the rule is stale"
    wrong = sorted(f"{name} imports {target}" for name in checked for target in imports(MODULES[name])
                   if any(matches(target, prefix) for prefix in forbidden))
    assert not wrong, f"{why}: " + "; ".join(wrong)


def test_nothing_in_the_package_imports_the_command_line():
    cli = ("peer.cli", "peer.commands", "peer.admin")  # the parser and the sub-commands' handlers
    wrong = sorted(name for name, path in MODULES.items() if name not in cli
                   and any(matches(t, "peer.cli") or matches(t, "peer.commands") for t in imports(path)))
    assert not wrong, f"modules below the CLI import it: {wrong}"
