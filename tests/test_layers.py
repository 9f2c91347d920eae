"""Imports only look down: no module imports from a layer above its own (docs/architecture.md)."""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "bioclip_jax"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def layer_table() -> dict[str, int]:
    """Top-level module or package name -> layer, from the docs' "### Ln" sections and their "- `name`" lines."""
    table, layer = {}, None
    for line in ARCHITECTURE.read_text().splitlines():
        if heading := re.match(r"### L(\d+)\b", line):
            layer = int(heading[1])
        elif (entry := re.match(r"- `(\w+)`", line)) and layer is not None:
            table[entry[1]] = layer
    return table


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module in the package tree as it is now."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: pathlib.Path, known: dict) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, top-level and function-local; `from a import b`
    counts as a.b when b is a module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
                      for alias in node.names]
    return found


def layer_of(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    return table.get(parts[1]) if parts[0] == "bioclip_jax" and len(parts) > 1 else None


def exempt(name: str, path: pathlib.Path) -> bool:
    return name == "bioclip_jax" or path.name == "__main__.py"


def upward_imports(table: dict[str, int], known: dict[str, pathlib.Path], root: pathlib.Path = REPO) -> list[str]:
    found = []
    for name, path in sorted(known.items()):
        if exempt(name, path):
            continue
        own = layer_of(name, table)
        for line, target in imported_names(name, path, known):
            other = layer_of(target, table)
            if other is not None and other > own:
                found.append(f"{name} (L{own}) imports {target} (L{other}) at {path.relative_to(root)}:{line}")
    return found


def test_every_module_has_a_layer():
    table, known = layer_table(), modules()
    unplaced = sorted({name.split(".")[1] for name, path in known.items()
                       if not exempt(name, path) and layer_of(name, table) is None})
    assert not unplaced, f"not in docs/architecture.md's layer table: {', '.join(unplaced)}"


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(layer_table(), modules()) == []


def test_an_upward_import_is_found_and_named(tmp_path):
    """The check sees function-local and relative imports, which a lazy import would hide."""
    data = tmp_path / "bioclip_jax" / "data"
    data.mkdir(parents=True)
    (data / "__init__.py").write_text("")
    (data / "reader.py").write_text("def read():\n"
                                    "    from bioclip_jax.cli import common\n"
                                    "    from ..train import loop\n")
    known = {"bioclip_jax.data": data / "__init__.py", "bioclip_jax.data.reader": data / "reader.py"}
    assert upward_imports(layer_table(), known, tmp_path) == [
        "bioclip_jax.data.reader (L3) imports bioclip_jax.cli (L7) at bioclip_jax/data/reader.py:2",
        "bioclip_jax.data.reader (L3) imports bioclip_jax.train (L6) at bioclip_jax/data/reader.py:3"]
