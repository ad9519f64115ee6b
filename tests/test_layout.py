"""The layout rule of docs/DESIGN.md §2: the two sides meet only on the wire, and common/ is transport-free."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][\w.]*)", re.MULTILINE)

FORBIDDEN = {
    "common": ("server", "client", "grpc", "proto"),
    "server": ("client",),
    "client": ("server",),
}


def _imports(package: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in IMPORT.findall(path.read_text()):
            found.append((str(path.relative_to(ROOT)), module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_it_must_not(package):
    bad = [(path, module) for path, module in _imports(package)
           if module.split(".")[0] in FORBIDDEN[package]]
    assert bad == [], f"{package}/ must not import {FORBIDDEN[package]}: {bad}"
