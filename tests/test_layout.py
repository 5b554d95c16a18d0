"""The code's shape as DESIGN.md states it: module size, no import cycles, the files it names exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hpcvae"


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _module(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _cycles(package: Path, root: Path = ROOT) -> list[list[str]]:
    """Import cycles among the non-``__init__`` modules of one package (a package's __init__ re-exports)."""
    files = {
        _module(p, root): p for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }
    graph = {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}
    found: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in stack:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif len(stack) < len(graph):
                walk(nxt, [*stack, nxt])

    for m in graph:
        walk(m, [m])
    return found


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"over the 600-line guide: {long}"


def test_the_shard_package_has_no_import_cycle():
    assert _cycles(PKG / "shards") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check above would pass vacuously if _cycles never found anything."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "a.py").write_text("from probe.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from probe.a import y\n")
    (pkg / "c.py").write_text("from probe.a import x\n")
    assert _cycles(pkg, tmp_path) and all("probe.c" not in c for c in _cycles(pkg, tmp_path))


def test_every_file_design_md_names_exists():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    named = set(re.findall(r"`((?:hpcvae|benchmarks|slurm|configs|tests)/[\w/.-]+\.(?:py|toml|sh))`", text))
    missing = sorted(n for n in named if "<" not in n and not (ROOT / n).exists())
    assert named and not missing, f"DESIGN.md names files that do not exist: {missing}"
