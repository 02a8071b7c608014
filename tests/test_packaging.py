"""Every package directory is declared in pyproject.toml (a non-editable install would miss it)."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_declared():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "trajgen").rglob("__init__.py")}
    for root in ("envs", "agents"):
        found |= {".".join(("trajgen", *p.parent.relative_to(REPO).parts)) for p in (REPO / root).rglob("__init__.py")}
    assert found <= declared, f"add to [tool.setuptools] packages: {sorted(found - declared)}"
