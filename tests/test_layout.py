"""The package's layering (eldric_p2p/__init__.py): imports only go down, and modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eldric_p2p"

# Lowest first. A module may import from its own layer and any layer below.
LAYERS = [
    {"errors", "units", "paths", "http_server", "tasks", "__init__"},
    {"data"},
    {"engine"},
    {"net"},
    {"pipeline"},
    {"api"},
    {"node"},
    {"commands", "cli", "__main__"},
]
MAX_LINES = 500


def layer_of(module: str) -> int:
    """`eldric_p2p.net.links` -> the index of the layer holding `net`."""
    parts = module.split(".")
    assert parts[0] == "eldric_p2p", module
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """Every eldric_p2p module `path` imports, at any depth (lazy and TYPE_CHECKING imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, package_dir).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "eldric_p2p":  # `from eldric_p2p import x`: x is a module or a name of __init__
                names = [a.name for a in node.names if a.name != "__version__"]
                found += [(node.lineno, f"eldric_p2p.{name}") for name in names]
                found.append((node.lineno, "eldric_p2p"))
            else:
                found.append((node.lineno, target))
    return sorted((line, m) for line, m in found if m == "eldric_p2p" or m.startswith("eldric_p2p."))


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_the_layers_it_documents() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == {"data", "engine", "net", "pipeline", "api", "commands"}
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc, f"{name}/__init__.py: say what the package owns"
        assert "May import" in doc or name == "commands", f"{name}/__init__.py: say what it may import"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path) -> None:
    mine = layer_of(module_name(path))
    upward = [f"line {line}: {m}" for line, m in imports_of(path) if layer_of(m) > mine]
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines; split it along its concerns"


def test_the_checker_sees_upward_imports_of_every_form(tmp_path: Path) -> None:
    pkg = tmp_path / "eldric_p2p"
    (pkg / "net").mkdir(parents=True)
    src = pkg / "net" / "x.py"
    src.write_text(
        "from eldric_p2p.errors import EldricError\n"
        "from eldric_p2p.api import metrics\n"
        "from ..pipeline import worker\n"
        "def f():\n    import eldric_p2p.node\n"
        "from . import links\n"
    )
    found = imports_of(src, pkg)
    assert [m for _, m in found] == [
        "eldric_p2p.errors", "eldric_p2p.api", "eldric_p2p.pipeline", "eldric_p2p.node", "eldric_p2p.net"
    ]
    mine = layer_of(module_name(src, pkg))
    upward = [m for _, m in found if layer_of(m) > mine]
    assert upward == ["eldric_p2p.api", "eldric_p2p.pipeline", "eldric_p2p.node"]
    with pytest.raises(AssertionError):
        layer_of("eldric_p2p.nowhere")
