"""The layers point one way: pyproject.toml's import-linter contracts hold (as `make test`'s
`lint-imports` checks them), and no two top-level packages import each other, even indirectly."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import grimp
from importlinter.application import use_cases
from importlinter.configuration import configure

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = str(REPO / "pyproject.toml")

configure()
OPTIONS = use_cases.read_user_options(PYPROJECT)
ROOTS = OPTIONS.session_options["root_packages"]
CONTRACTS = {options["id"]: options for options in OPTIONS.contracts_options}


def test_the_contracts_cover_every_top_level_package():
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")
    assert sorted(ROOTS) == packages
    assert {"layers", "http", "models"} <= set(CONTRACTS)
    assert CONTRACTS["layers"]["layers"] == ["local", "api", "graphs | training", "deployments", "storage"]


def test_the_import_contracts_are_kept(monkeypatch):
    """What `make test` runs first (`lint-imports`); a broken contract prints its import chains."""
    monkeypatch.chdir(REPO)
    assert use_cases.lint_imports(PYPROJECT, cache_dir=None, no_logo=True), \
        "an import-linter contract is broken: its import chains are printed above (or run `make lint`)"


def test_every_ignored_import_says_why():
    lines = Path(PYPROJECT).read_text().splitlines()
    for number, line in enumerate(lines):
        if " -> " in line and line.strip().startswith('"'):
            assert lines[number - 1].strip().startswith("#"), f"pyproject.toml:{number + 1}: an ignore without a why"


def test_no_two_top_level_packages_import_each_other():
    # The raw graph, before any contract's ignore_imports: an ignore must never hide a cycle.
    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    cycles = []
    for a, b in combinations(sorted(ROOTS), 2):
        there = graph.find_shortest_chain(importer=a, imported=b, as_packages=True)
        back = graph.find_shortest_chain(importer=b, imported=a, as_packages=True)
        if there and back:
            cycles.append(f"{a} <-> {b}: {' -> '.join(there)} ; {' -> '.join(back)}")
    assert not cycles, "\n".join(cycles)
