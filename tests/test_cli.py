"""The command line: help, version, and the exit-code contract."""

import subprocess
import sys

import pytest

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


def _option_entries(help_text: str) -> dict[str, str]:
    """Option strings -> the whole (unwrapped) help entry, from a ``--help`` output."""
    body = help_text.split("options:\n", 1)[1]
    entries: list[list[str]] = []
    for line in body.splitlines():
        if line.startswith("  -"):
            entries.append([line])
        elif entries and line.startswith("   "):
            entries[-1].append(line)
    joined = [" ".join(" ".join(e).split()) for e in entries]
    return {entry.split(" ")[0].rstrip(","): entry for entry in joined}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_states_every_default(capsys):
    from openmm_reversible.commands import NAMES
    from openmm_reversible.commands.benchmark import BENCHMARKS

    pages = [(name,) for name in NAMES] + [("benchmark", name) for name in BENCHMARKS]
    for argv in pages:
        entries = _option_entries(_help(capsys, *argv))
        assert len(entries) >= 2, argv
        for option, entry in entries.items():
            if option in ("-h", "--version"):
                continue
            assert "default" in entry or entry.endswith("(required)"), (argv, entry)
    gradcheck = _option_entries(_help(capsys, "gradcheck"))
    assert gradcheck["--timestep"].endswith("ps (default: 0.001)")
    assert gradcheck["--steps"].endswith("simulation steps (required)")
    assert gradcheck["--json"].endswith("(default: off)")
    assert "(default: steps // 5, at least 1)" in gradcheck["--snapshot-every"]
    assert _option_entries(_help(capsys, "validate"))["--steps"].endswith("(default: 5000)")
    assert _option_entries(_help(capsys, "benchmark", "exact"))["--steps"].endswith(
        "(default: 100000)")


def test_help_defaults_are_the_library_defaults():
    """An option's default comes from the library function it feeds (one value, one place)."""
    import inspect

    from openmm_reversible.cli import build_parser
    from openmm_reversible.gradcheck import check_forcefield_gradients
    from openmm_reversible.validate import validate

    parser = build_parser()
    gradcheck = parser.parse_args(["gradcheck", "--forcefield", "x", "--pdb", "y", "--steps",
                                   "1"])
    validated = parser.parse_args(["validate", "t.xml", "--config", "c.toml"])
    for namespace, function in ((gradcheck, check_forcefield_gradients),
                                (validated, validate)):
        for name, parameter in inspect.signature(function).parameters.items():
            if hasattr(namespace, name) and parameter.default is not inspect.Parameter.empty:
                assert getattr(namespace, name) == parameter.default, name


def test_exit_codes_are_documented():
    import openmm_reversible.cli as cli

    for line in ("**0**", "**1**", "**2**", "**3**", "--debug"):
        assert line in cli.__doc__


@pytest.mark.parametrize("argv, fragment", [
    (["gradcheck", "--pdb", "x.pdb", "--steps", "2"], "the following arguments are required: "
                                                      "--forcefield"),
    (["verify", "s.xml", "c.pdb", "--platform"], "argument --platform: expected one argument"),
    (["benchmark", "exact", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].endswith("--help'"), lines
