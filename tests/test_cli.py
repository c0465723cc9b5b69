"""The command line: help, version, and the exit-code contract."""

import subprocess
import sys

from openmm_reversible import __version__
from openmm_reversible.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_program(capsys):
    assert main([]) == 0
    assert "openmm-reversible" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "openmm_reversible.cli", "--help"],
                         capture_output=True, text=True, check=True)
    assert "usage: openmm-reversible" in out.stdout
