"""Does the built wheel work with only its declared dependencies? Build it, install it into a fresh virtual
environment that holds exactly the closure of its core ``Requires-Dist`` (nothing else: no system site
packages, no extras, no PYTHONPATH), import the public API, save and load a checkpoint on one process.

Usage: ``python scripts/wheel_check.py [WORKDIR]`` from the project's venv (``source scripts/env.sh``). Prints one
JSON line with the timings; exits non-zero with the reason if the wheel does not work.

Installing torch and its CUDA libraries from an index would download gigabytes each run. Instead, the fresh
venv's site-packages is made of links to the files of exactly those distributions in the project's venv, which
``scripts/env.sh`` built from ``requirements/lock.txt`` (so torch is the lock file's version). The closure is
computed from the wheel's own metadata (markers evaluated, extras requested by a requirement followed), so a
dependency missing from ``pyproject.toml`` is missing here too, and ``pip check`` in the fresh venv verifies
what the wheel declares. The wheel itself is installed by pip (``--no-deps --no-index``) as a user would.
"""

from __future__ import annotations

import email.parser
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CANNOT_BUILD = 3  # exit status when pip cannot build the wheel at all (the test then skips, saying why)

SMOKE = r"""
import os, sys, tempfile
assert "lightning_distckpt" not in sys.modules
import lightning_distckpt as ld
assert os.path.dirname(ld.__file__).startswith(sys.prefix), ld.__file__   # the installed wheel, not a checkout
from lightning_distckpt import (DistCheckpoint, DistCheckpointIO, CompressionConfig, export_checkpoint,
                                list_checkpoints, load_checkpoint, verify)
import torch
d = tempfile.mkdtemp()
for compression in (None, "lossless", "int8"):
    url = os.path.join(d, f"ck-{compression}")
    w = torch.randn(64, 64)
    ck = {"state_dict": {"w": w}, "global_step": 3, "note": ("a", 1)}
    DistCheckpointIO(compression=compression).save_checkpoint(ck, url)
    back = load_checkpoint(url)
    assert back["global_step"] == 3 and back["note"] == ("a", 1)
    if compression != "int8":
        assert torch.equal(back["state_dict"]["w"], w)
    assert verify(url).ok
assert [c.name for c in list_checkpoints(d)] == ["ck-None", "ck-lossless", "ck-int8"]
from lightning_distckpt.cli.main import main
assert main(["ls", d, "--quiet"]) == 0
print("smoke ok")
"""


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirements need, transitively (markers evaluated for this
    interpreter; extras named by a requirement followed). Raises if one is not installed."""
    env = default_environment()
    out: dict[str, md.Distribution] = {}
    todo = [(Requirement(r), "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        extras = sorted(req.extras) or [""]
        dist = out.get(name) or md.distribution(req.name)
        if not req.specifier.contains(dist.version, prereleases=True):
            raise RuntimeError(f"{req}: the installed {req.name} is {dist.version}")
        out[name] = dist
        for ex in extras + ([""] if "" not in extras else []):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            todo += [(Requirement(r), ex) for r in dist.requires or []]
    return out


def link_site_packages(dists: dict[str, md.Distribution], site: Path) -> int:
    """Make ``site`` hold the files of exactly ``dists`` (links into their installation); returns the number
    of links. A top-level directory shared with a distribution outside ``dists`` (a namespace package such as
    ``nvidia/``) is made for real and its entries linked one level down."""
    owners: dict[tuple[str, ...], set[str]] = {}
    for dist in md.distributions():
        owner = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            parts = Path(f).parts
            if parts and parts[0] != "..":
                owners.setdefault(parts[:1], set()).add(owner)
                owners.setdefault(parts[:2], set()).add(owner)
    wanted = set(dists)
    links = 0
    for name, dist in dists.items():
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            parts = Path(f).parts
            if not parts or parts[0] == ".." or parts[0] == "__pycache__":
                continue
            key = parts[:1] if owners.get(parts[:1], set()) <= wanted or len(parts) == 1 else parts[:2]
            dst = site.joinpath(*key)
            if dst.exists() or dst.is_symlink():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(base.joinpath(*key))
            links += 1
    return links


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="distckpt-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    src = work / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "lightning_distckpt", src / "lightning_distckpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist_dir = work / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(dist_dir), str(src)], capture_output=True, text=True)  # fmt: skip
    if build.returncode != 0:
        print(f"cannot build the wheel here (pip wheel failed):\n{build.stdout[-2000:]}{build.stderr[-4000:]}", file=sys.stderr)
        return CANNOT_BUILD
    wheel = next(dist_dir.glob("lightning_distckpt-*.whl"))
    times["build_s"] = time.perf_counter() - t
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    core = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    t = time.perf_counter()
    venv = work / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    dists = closure(core)
    links = link_site_packages(dists, site)
    times["venv_s"] = time.perf_counter() - t
    t = time.perf_counter()
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--no-compile", str(wheel)], check=True,
                   env=clean_env)  # fmt: skip
    times["install_s"] = time.perf_counter() - t
    t = time.perf_counter()
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=clean_env)
    times["check_s"] = time.perf_counter() - t
    if check.returncode != 0:
        print(f"pip check in the fresh venv failed:\n{check.stdout}{check.stderr}", file=sys.stderr)
        return 1
    t = time.perf_counter()
    smoke = subprocess.run([str(python), "-I", "-c", SMOKE], capture_output=True, text=True,
                           env={**clean_env, "OMP_NUM_THREADS": "1"}, cwd=str(work))  # fmt: skip
    times["smoke_s"] = time.perf_counter() - t
    if smoke.returncode != 0 or "smoke ok" not in smoke.stdout:
        print(f"the installed wheel failed with only its declared dependencies ({sorted(dists)}):\n"
              f"{smoke.stdout[-3000:]}{smoke.stderr[-6000:]}", file=sys.stderr)
        return 1
    print(json.dumps({"wheel": wheel.name, "core_requirements": core, "distributions": len(dists), "links": links,
                      **{k: round(v, 1) for k, v in times.items()}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
