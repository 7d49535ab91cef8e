"""The checked-in gRPC stubs are what proto/generate.py makes of proto/ (and nothing imports `proto`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_module_imports_a_top_level_proto_package():
    offenders = [str(p) for folder in ("peer", "dht", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
                 if any(line.startswith(("import proto", "from proto ", "from proto."))
                        for line in p.read_text().splitlines())]
    assert not offenders
