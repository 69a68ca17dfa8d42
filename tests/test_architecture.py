"""The architecture holds: layers import one way (import-linter), modules stay small, settings have one source."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cpwb"
MAX_MODULE_LINES = 420  # past ~400 lines a module usually holds two concepts


def test_the_layers_import_one_way():
    """`lint-imports` checks the contracts in pyproject.toml: app > analysis > steps > engine > data > core."""
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 3


def test_the_code_passes_ruff():
    """ruff with pyproject.toml's rules (pycodestyle, pyflakes, import order; 120 columns) over the code, its tests
    and the notebooks: a lint slip fails here, not in a reviewer's eye."""
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "--no-cache", "cpwb", "tests", "benchmarks", "scripts", "notebooks"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_every_module_lies_in_a_layer_and_the_contract_names_them_all():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = {layer.removeprefix("cpwb.") for layer in contracts[0]["layers"]}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == layers, f"subpackages {sorted(packages)} vs layers {sorted(layers)}"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside every layer: {loose}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concept"


def test_python_m_cpwb_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "cpwb", "--version"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip().startswith("cpwb ")
