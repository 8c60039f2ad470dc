"""Every example runs (small settings) and does what its docstring says."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run, torchrun_cmd

from lightning_distckpt import list_checkpoints

EX = ROOT / "examples"
pytestmark = pytest.mark.slow


def test_quickstart_trains_on_2_processes_and_resumes(tmp_path):
    """The README's main job: 2 processes, checkpoints to a local directory, then a resumed run."""
    first = run(torchrun_cmd(EX / "quickstart.py", 2, "--ckpt-dir", tmp_path / "ck", "--max-steps", 40))
    assert "finished at step 40" in first.stdout
    second = run(torchrun_cmd(EX / "quickstart.py", 2, "--ckpt-dir", tmp_path / "ck", "--max-steps", 60, "--async-save"))
    assert "finished at step 60" in second.stdout and "step=40" in second.stderr.split("Restoring states")[1]
    assert [c.name.split("-")[1] for c in list_checkpoints(str(tmp_path / "ck"))] == ["step=40", "step=60"]


def test_lightning_cli_yaml_example(tmp_path):
    cfg = (EX / "cli" / "config.yaml").read_text().replace("./cli-ckpts", str(tmp_path / "ck"))
    (tmp_path / "config.yaml").write_text(cfg)
    run(torchrun_cmd(EX / "cli" / "train.py", 2, "fit", "--config", tmp_path / "config.yaml", "--trainer.max_steps", 40),
        cwd=tmp_path)  # fmt: skip
    out = run(torchrun_cmd(EX / "cli" / "train.py", 2, "fit", "--config", tmp_path / "config.yaml", "--ckpt_path", "last",
                           "--trainer.max_steps", 80), cwd=tmp_path)  # fmt: skip
    assert "Restoring states from the checkpoint path" in out.stdout + out.stderr
    listed = list_checkpoints(str(tmp_path / "ck"))
    assert [c.name.split("-")[1] for c in listed] == ["step=40", "step=80"] and all(c.manifest.compression for c in listed)


@pytest.mark.hdfs
def test_hdfs_with_replicas_example(healthy_minidfs, tmp_path):
    url = f"{healthy_minidfs.namenode_url}/example-{tmp_path.name}"
    args = ["--dirpath", url, "--replica", tmp_path / "replica", "--max-steps"]
    run(torchrun_cmd(EX / "hdfs_replicas.py", 0, *args, 40))
    out = run(torchrun_cmd(EX / "hdfs_replicas.py", 0, *args, 60))
    assert "finished at step 60" in out.stdout and "resumed from hdfs://" in out.stdout
    assert [c.name for c in list_checkpoints(str(tmp_path / "replica"))] == [c.name for c in list_checkpoints(url)]


def test_compression_example():
    out = run(torchrun_cmd(EX / "compression.py", 0, "--steps", 47)).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-4:]}
    assert set(rows) == {"None", "lossless", "bf16", "int8"}
    assert float(rows["int8"][2]) <= 0.30 and float(rows["bf16"][2]) <= 0.55 and float(rows["lossless"][2]) < 1.0
    assert rows["lossless"][3:] == rows["None"][3:]  # bit-identical resumed losses


def test_distillation_example(tmp_path):
    run(torchrun_cmd(EX / "distill.py", 0, "--seeds", 1, "--steps", 47, "--out", tmp_path / "d.json"))
    r = json.loads((tmp_path / "d.json").read_text())
    assert r["size_ratio"] >= 4 and 0 < r["student_kd_acc_mean"] <= 1 and r["teacher"]["ckpt_bytes_int8"] > 0


def test_quickstart_page_shows_the_tested_script_and_its_install_step_covers_its_imports():
    """docs/quickstart.md includes examples/quickstart.py whole (the file the test above runs), and its
    install command brings every package the script imports."""
    import ast
    import re
    import sys
    from importlib.metadata import packages_distributions, requires

    page = (ROOT / "docs" / "quickstart.md").read_text()
    assert '--8<-- "examples/quickstart.py"' in page
    install = re.search(r"^pip install (.+?)(?:\s+#.*)?$", page, re.M)
    assert install, "no pip install line on the quickstart page"
    installed = {n.lower() for n in install.group(1).split()}
    declared = {re.split(r"[ <>=!\[;]", r)[0].lower() for r in requires("lightning-distckpt") or [] if "extra ==" not in r}
    provided = installed | declared
    dists = packages_distributions()
    script = ast.parse((EX / "quickstart.py").read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(script) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(script) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    missing = []
    for top in sorted(tops - set(sys.stdlib_module_names) - {"__future__"}):
        names = {d.lower() for d in dists.get(top, [])} | ({"lightning-distckpt"} if top == "lightning_distckpt" else set())
        if not names & provided:
            missing.append(f"{top} (from {sorted(names) or '?'})")
    assert not missing, f"the quickstart's install step does not bring: {missing}"
