"""`pip install .` alone (the README's "everything") brings every library the package imports."""

import ast
import configparser
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent

# Imported only when present, each behind an ImportError that says what to install.
OPTIONAL = {"torch": "convert/state_dict_io.py reads PyTorch .bin pickles only when torch is installed"}


def install_requires() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines()]
    return {canonicalize_name(Requirement(line).name) for line in lines if line and not line.startswith("#")}


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one package file importing it (function-level imports included)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "bioclip_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "bioclip_jax":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_library_is_in_install_requires():
    required = install_requires()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules().items():
        if module in OPTIONAL:
            continue
        distributions = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not distributions & required:
            missing[module] = where
    assert not missing, f"imported but not in setup.cfg install_requires (module: first importer): {missing}"
    assert "huggingface-hub" in required  # hub.py: every hf-hub: source, predict's default model


def test_hub_module_imports_with_its_library():
    import huggingface_hub  # noqa: F401 - an install_requires dependency, so always importable

    from bioclip_jax import hub

    assert hub.cache_dir()
