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


def test_site_in_a_real_browser_has_no_hidden_overflow_empty_headers_raw_roles_or_negative_zeros(tmp_path):
    """tools/docs_screenshots.py lays every page out in headless Chromium at 1280 px and measures it."""
    import shutil

    import pytest

    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("Chromium is not installed (apt-get install chromium): the browser check of the docs cannot run")
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "docs_screenshots.py")], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "index: ok" in p.stdout and "configuration: ok" in p.stdout  # it really looked at the pages


def test_the_browser_check_catches_what_it_is_for(tmp_path):
    """The probe itself: a page with a cut code line, an empty header row, a raw role and -0.00 is reported."""
    import shutil

    import pytest

    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("Chromium is not installed (apt-get install chromium): the browser check of the docs cannot run")
    page = tmp_path / "site" / "bad" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        '<html><body><div class="md-content">'
        '<pre style="width:300px;overflow-x:auto"><code>' + "x = 1  # " + "a long comment " * 20 + "</code></pre>"
        "<table><thead><tr><th></th><th></th></tr></thead><tbody><tr><td>a</td><td>b</td></tr></tbody></table>"
        "<p>See :class:`Foo`. Stall -0.00 s.</p></div></body></html>"
    )
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "docs_screenshots.py"), "--site", str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    for kind in ("overflow", "empty_headers", "roles", "negative_zero"):
        assert f"bad: {kind}:" in p.stdout, (kind, p.stdout)


def test_benchmark_pages_are_what_the_results_render():
    """Every number on the benchmark pages comes from benchmarks/results/ through report.py (none edited by hand,
    none left unrendered), and a table measured before the package or the benchmarks last changed says it is stale."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


def test_report_check_catches_a_number_edited_by_hand(tmp_path):
    import shutil

    for d in ("benchmarks", "docs", "tools/lightning_compat"):  # what report.py reads (outside any git repository)
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "img"))
    (tmp_path / "docs" / "img").mkdir()
    page = tmp_path / "docs" / "benchmarks.md"
    text = page.read_text()
    edited = text.replace("**0.", "**9.", 1)  # the first ratio printed in bold
    assert edited != text
    page.write_text(edited)
    p = subprocess.run([sys.executable, str(tmp_path / "benchmarks" / "report.py"), "--check"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert "docs/benchmarks.md: differs" in p.stdout
