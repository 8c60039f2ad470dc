"""The package's layering, read from its source: one-way imports, no cycles, no names that shadow others,
no import side effects, and registries a third party can extend (docs/architecture.md states the rule)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys

import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, env

PKG = ROOT / "lightning_distckpt"

#: docs/architecture.md: a module may import its own sub-package and sub-packages on lower floors only
FLOORS = {
    "errors": 0, "faults": 0, "gcpause": 0,
    "ondisk": 1, "parallel": 1,
    "transforms": 2, "storage": 2,
    "catalog": 3,
    "engine": 4,
    "ops": 5, "integration": 5,
    "cli": 6,
}  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The package module an import of ``name`` executes (a package's ``__init__``, a module), or None."""
    while name and name not in MODULES:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def imports_of(path: Path) -> set[str]:
    """Every package module that ``path`` imports, at module level or inside a function (eager or lazy)."""
    out = set()
    here = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            if n.startswith("lightning_distckpt."):  # the root package runs first anyway: not an edge
                target = resolve(n)
                if target and target != here and target != "lightning_distckpt":
                    out.add(target)
    return out


GRAPH = {m: imports_of(p) for m, p in MODULES.items()}


def floor_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package's __init__: the lazy public facade, above every layer
    return parts[1], FLOORS[parts[1]]


def test_every_subpackage_has_a_floor():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops <= set(FLOORS), f"sub-packages without a floor in docs/architecture.md: {tops - set(FLOORS)}"


def test_imports_point_down_the_layers():
    bad = []
    for module, targets in GRAPH.items():
        mine = floor_of(module)
        if mine is None:
            continue
        for t in targets:
            theirs = floor_of(t)
            if theirs[0] != mine[0] and theirs[1] >= mine[1]:
                bad.append(f"{module} (floor {mine[1]}) imports {t} (floor {theirs[1]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_graph_is_not_empty():  # guards the tests above against a parser that finds nothing
    assert len(MODULES) > 30
    assert "lightning_distckpt.catalog" in GRAPH["lightning_distckpt.engine.loading"]
    assert "lightning_distckpt.catalog.documents" in GRAPH["lightning_distckpt.catalog"]
    assert "lightning_distckpt.ondisk.names" in GRAPH["lightning_distckpt.ondisk.documents"]


def test_no_module_shadows_stdlib_builtins_or_dependencies():
    import builtins

    taken = set(sys.stdlib_module_names) | set(dir(builtins))
    taken |= {"torch", "lightning", "fsspec", "xxhash", "psutil", "numpy", "zstandard", "hdfs_native", "requests",
              "jsonargparse", "rich", "safetensors", "happybase", "thriftpy2", "typing_extensions"}
    taken.discard("__init__")
    bad = [m for m in MODULES if m.rsplit(".", 1)[-1] in taken]
    assert not bad, f"modules named like the standard library, a builtin or a dependency: {bad}"


def test_importing_the_package_changes_nothing_and_the_plugin_routes():
    script = textwrap.dedent("""
        import importlib, logging, os, pkgutil, sys, warnings
        import torch, lightning.pytorch as pl
        from lightning.pytorch.strategies import Strategy
        before = (Strategy.__dict__["checkpoint_io"], dict(os.environ), list(sys.path), list(warnings.filters),
                  logging.getLogger().level, len(logging.getLogger().handlers), torch.get_default_dtype(),
                  torch.get_num_threads())
        import lightning_distckpt
        for m in pkgutil.walk_packages(lightning_distckpt.__path__, "lightning_distckpt."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
        import lightning_distckpt as d
        for n in d.__all__:
            getattr(d, n)
        after = (Strategy.__dict__["checkpoint_io"], dict(os.environ), list(sys.path), list(warnings.filters),
                 logging.getLogger().level, len(logging.getLogger().handlers), torch.get_default_dtype(),
                 torch.get_num_threads())
        names = ["Strategy.checkpoint_io", "os.environ", "sys.path", "warnings.filters", "root log level",
                 "root log handlers", "default dtype", "threads"]
        changed = [n for n, a, b in zip(names, before, after) if a != b]
        assert not changed, f"importing the package changed {changed}"
        io = d.DistCheckpointIO()
        assert Strategy.__dict__["checkpoint_io"] is not before[0], "constructing the plugin installs routing"
        trainer = pl.Trainer(plugins=[io], accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        assert type(trainer.strategy).__name__.startswith("Routed"), type(trainer.strategy)
        plain = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        assert not type(plain.strategy).__name__.startswith("Routed")
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ---- registries: a third party adds a store and a codec without editing the package ----------------------
def test_a_store_and_a_block_codec_registered_from_outside_save_and_load(tmp_path):
    from lightning_distckpt import DistCheckpointIO, verify
    from lightning_distckpt.storage import LocalStore, register_store
    from lightning_distckpt.transforms import BlockCodec, CompressionConfig, register_block_codec

    opened = []

    def toy(url: str, config):  # toy://<name>/<path> lives under tmp_path/<name>/<path>
        opened.append(url)
        return LocalStore(durable=False), str(tmp_path / url.split("://", 1)[1]).rstrip("/")

    class Xor(BlockCodec):
        name = "test-xor-1"

        def encode(self, raw, itemsize=1):
            return bytes(b ^ 0x5A for b in bytes(raw))

        def decode(self, stored, raw_len):
            return bytes(b ^ 0x5A for b in bytes(stored))

    register_store("toy", toy)
    register_block_codec("test-xor-1", Xor)
    with pytest.raises(ValueError, match="already"):
        register_store("toy", lambda url, config: None)
    t = torch.arange(1000, dtype=torch.float32)
    io = DistCheckpointIO(compression=CompressionConfig(block_codec="test-xor-1"))
    io.save_checkpoint({"state_dict": {"w": t}, "global_step": 3}, "toy://bucket/ck")
    stored = (tmp_path / "bucket" / "ck" / "__0_0.distcp").read_bytes()
    assert t.numpy().tobytes() not in stored  # the codec really transformed the bytes
    assert verify("toy://bucket/ck").ok
    back = io.load_checkpoint("toy://bucket/ck")
    assert torch.equal(back["state_dict"]["w"], t) and back["global_step"] == 3
    assert opened and all(u.startswith("toy://") for u in opened)


def test_entry_points_register_a_store_in_a_fresh_process(tmp_path):
    """A distribution that declares ``lightning_distckpt.stores`` and ``lightning_distckpt.block_codecs``
    entry points is picked up without any call (the import system finds its dist-info on sys.path)."""
    site = tmp_path / "site"
    (site / "toyplug-0.1.dist-info").mkdir(parents=True)
    (site / "toyplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (site / "toyplug-0.1.dist-info" / "entry_points.txt").write_text(
        "[lightning_distckpt.stores]\nep = toyplug:open_store\n\n[lightning_distckpt.block_codecs]\nep-neg-1 = toyplug:Neg\n")
    (site / "toyplug.py").write_text(textwrap.dedent(f"""
        from lightning_distckpt.storage import LocalStore
        from lightning_distckpt.transforms import BlockCodec
        def open_store(url, config):
            return LocalStore(durable=False), {str(tmp_path)!r} + "/" + url.split("://", 1)[1]
        class Neg(BlockCodec):
            name = "ep-neg-1"
            def encode(self, raw, itemsize=1):
                return bytes(255 - b for b in bytes(raw))
            def decode(self, stored, raw_len):
                return bytes(255 - b for b in bytes(stored))
    """))
    script = textwrap.dedent("""
        import torch
        from lightning_distckpt import DistCheckpointIO
        from lightning_distckpt.transforms import CompressionConfig
        io = DistCheckpointIO(compression=CompressionConfig(block_codec="ep-neg-1"))
        io.save_checkpoint({"state_dict": {"w": torch.ones(10)}}, "ep://x/ck")
        assert torch.equal(DistCheckpointIO().load_checkpoint("ep://x/ck")["state_dict"]["w"], torch.ones(10))
        print("OK")
    """)
    e = env()
    e["PYTHONPATH"] = f"{site}:{e['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "x" / "ck" / "COMMITTED").exists()


def test_unknown_scheme_without_backend_names_the_url():
    from lightning_distckpt.storage import open_store

    assert importlib.util.find_spec("s3fs") is None, "this test expects s3fs not to be installed"
    with pytest.raises(Exception, match="s3"):
        store, path = open_store("s3://bucket/ckpts")
        store.listdir(path)
