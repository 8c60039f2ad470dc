"""What a plain ``pip install lightning-distckpt`` gets (issue 12, item 10): every third-party module the package
imports is declared in pyproject.toml (core, or the extra that needs it, imported only where it is used), and
the built wheel, installed with its declared core dependencies only, imports and saves and loads."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import json
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PKG = ROOT / "lightning_distckpt"
#: import name -> distribution, for modules that may not be installed here (packages_distributions() knows the rest)
KNOWN = {"hdfs_native": "hdfs-native", "pyarrow": "pyarrow", "safetensors": "safetensors", "happybase": "happybase",
         "thriftpy2": "thriftpy2", "s3fs": "s3fs", "yaml": "pyyaml", "zstandard": "zstandard"}  # fmt: skip


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = {k: {canonicalize_name(Requirement(r).name) for r in v} for k, v in project["optional-dependencies"].items()}
    return core, extras


def imports() -> list[tuple[str, str, int, bool]]:
    """(top-level module, file, line, eager) for every import of a third-party module in the package; eager:
    at module level, outside ``try``/``if TYPE_CHECKING`` (runs whenever the module is imported)."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        eager_nodes = set()

        def collect(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    eager_nodes.add(id(node))
                elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                    collect(node.body)
                    collect(node.orelse)

        collect(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "lightning_distckpt":
                    out.append((top, str(path.relative_to(ROOT)), node.lineno, id(node) in eager_nodes))
    return out


@functools.lru_cache(maxsize=1)
def installed_modules() -> dict[str, list[str]]:
    """import name -> distributions, scanned once (``packages_distributions`` reads every installed distribution)."""
    return md.packages_distributions()


def distributions_of(module: str) -> set[str]:
    found = installed_modules().get(module, [])
    return {canonicalize_name(d) for d in found} | ({canonicalize_name(KNOWN[module])} if module in KNOWN else set())


def test_the_import_scan_sees_the_package():  # guards the checks below against a scan that finds nothing
    found = {m for m, *_ in imports()}
    assert {"torch", "lightning", "xxhash", "zstandard", "numpy", "safetensors"} <= found


def test_every_imported_third_party_module_is_declared():
    core, extras = declared()
    anywhere = core.union(*extras.values())
    undeclared = [f"{file}:{line}: import {m} (distribution {sorted(distributions_of(m)) or '?'})"
                  for m, file, line, _ in imports() if not distributions_of(m) & anywhere]  # fmt: skip
    assert not undeclared, "imports of modules that pyproject.toml does not declare:\n" + "\n".join(undeclared)


def test_modules_of_extras_are_imported_only_where_they_are_used():
    core, _ = declared()
    eager = [f"{file}:{line}: import {m} at module level, but {sorted(distributions_of(m))} is not a core dependency"
             for m, file, line, is_eager in imports() if is_eager and not distributions_of(m) & core]  # fmt: skip
    assert not eager, "\n".join(eager)


@pytest.mark.slow
def test_the_built_wheel_works_with_its_declared_dependencies_only(tmp_path):
    """scripts/wheel_check.py: build the wheel, a fresh venv with exactly the closure of its core requirements
    (the lock file's versions), install it, import the public API, save and load on one process."""
    try:
        import packaging  # noqa: F401 - the script resolves requirements with it
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"scripts/wheel_check.py needs packaging: {e}")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "wheel_check.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    if p.returncode == 3:  # CANNOT_BUILD
        pytest.skip(p.stderr[-2000:])
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    print(result)  # build, venv, install and smoke times
    assert "zstandard>=0.22" in result["core_requirements"] and "numpy>=1.24" in result["core_requirements"]
