"""The README's and the tutorials' commands, run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_example_runs_as_written(tmp_path):
    """The Python block of the README, in a fresh interpreter, from a copy of the layout it
    names (examples/ beside it): the gradient is filled and the trained XML is written."""
    (block,) = [b for b in _blocks(ROOT / "README.md", "python") if "write_xml" in b
                and "ReversibleSimulation(" in b]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = block + "\nimport torch\nassert torch.isfinite(params.scaled.grad).all()\n" \
                     "assert params.scaled.grad.abs().sum() > 0\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    assert (tmp_path / "trained" / "water_flexible.xml").is_file()


def test_tutorial_readme_command_runs_as_written(tmp_path):
    """tutorials/README.md's command (jupyter execute), at the small size, on the gradients
    notebook."""
    (block,) = _blocks(ROOT / "tutorials" / "README.md", "bash")
    (command,) = [line for line in block.splitlines() if "jupyter" in line]
    command = command.replace("01_quickstart.ipynb", "02_checking_gradients.ipynb")
    env = {**os.environ, "OPENMM_REVERSIBLE_TUTORIAL_SIZE": "small",
           "OPENMM_REVERSIBLE_TUTORIAL_OUTPUT": str(tmp_path)}
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.fail("the tutorials' command uses ../.venv/bin/jupyter: run `make env` first")
    done = subprocess.run(command, shell=True, cwd=ROOT / "tutorials", env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
