"""The documentation builds with MkDocs in strict mode (warnings are errors), reference pages included."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_docs_build_strict(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    html = (tmp_path / "site" / "configuration" / "index.html").read_text()
    for name in ("DistCheckpointIO", "DistCheckpoint", "HdfsOptions", "CompressionConfig", "KnowledgeDistillation"):
        assert name in html  # generated from the docstrings
    assert "UncommittedCheckpointError" in (tmp_path / "site" / "troubleshooting" / "index.html").read_text()
