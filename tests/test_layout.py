"""The codebase's shape: small modules, one epoch loop, layers that point down (the contracts in
pyproject.toml, which `lint-imports` checks in CI; here, the same check when it is installed)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "fashionlens").rglob("*.py"))


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def _epoch_loops(path: Path) -> int:
    return sum(isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "epoch"
               for node in ast.walk(ast.parse(path.read_text())))


def test_one_epoch_loop():
    assert {str(p.relative_to(ROOT)): n for p in SOURCES if (n := _epoch_loops(p))} == {
        "src/fashionlens/training/engine.py": 1}


LINT = shutil.which("lint-imports") or shutil.which("lint-imports", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed")
def test_layers_point_down():
    proc = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
