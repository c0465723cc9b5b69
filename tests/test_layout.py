"""The package's rooms: imports run from higher rooms to lower ones, never back, and no module
imports another's private names. (docs/design.md, "Layout", lists the rooms.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openmm_reversible"

ROOMS = [
    ("units", "errors", "files", "geometry", "methods", "safe_math"),
    ("trajectory", "potential"),
    ("parameters",),
    ("integrators",),
    ("exact",),
    ("observables", "reweighting", "losses", "priors", "target_files", "ml"),
    ("systems", "config", "sampler", "parallel", "gas"),
    ("train", "crystal", "outputs", "export", "verify", "gradcheck", "validate",
     "benchmarks"),
    ("commands", "cli"),
]
"""Ground floor first; a module may import from its own room and the rooms below."""

RANK = {name: level for level, names in enumerate(ROOMS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, parts, is_package


def _imports(path: Path, parts: list[str], is_package: bool):
    """(imported module parts, imported names) of every import in the file, lazy included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            yield target, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split("."), []


def test_every_module_has_a_room():
    rooms = {parts[1] for _, parts, _ in _modules() if len(parts) > 1}
    assert rooms <= set(RANK), f"modules without a room in ROOMS: {sorted(rooms - set(RANK))}"


def test_imports_never_run_from_a_lower_room_to_a_higher_one():
    upward = []
    for path, parts, is_package in _modules():
        if len(parts) < 2:
            continue  # the package root re-exports the public API lazily
        for target, _ in _imports(path, parts, is_package):
            if target[0] != "openmm_reversible" or len(target) < 2:
                continue
            if RANK[target[1]] > RANK[parts[1]]:
                upward.append(f"{'.'.join(parts)} imports {'.'.join(target)}")
    assert not upward, "imports from a lower room to a higher one:\n" + "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = []
    for path, parts, is_package in _modules():
        for target, names in _imports(path, parts, is_package):
            if target[0] != "openmm_reversible":
                continue
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            hidden += [p for p in target if p.startswith("_") and not p.startswith("__")]
            if hidden:
                private.append(f"{'.'.join(parts)} imports {hidden} from {'.'.join(target)}")
    assert not private, "private names imported across modules:\n" + "\n".join(private)
