"""Build the documentation site and look at it in a real browser (headless Chromium, Debian's package).

    python tools/docs_screenshots.py                       # build, check every page, exit 1 on a problem
    python tools/docs_screenshots.py --shots /tmp/shots    # also a PNG of each page at 1280 px to look at
    python tools/docs_screenshots.py --site SITE_DIR       # check an already built site

For every page, Chromium lays it out at 1280 px wide and a probe script (added to a copy of the page) reports:

* **hidden overflow**: an element whose content is wider than its box (``scrollWidth > clientWidth``) while
  the box clips or scrolls it: a code block whose comments are cut off, a table column pushed out of view;
* **empty header rows**: a table whose header cells are all empty;
* **raw roles**: Sphinx/reST roles (``:class:`X```, ``:func:``, ``:mod:``, ...) that the Markdown renderer
  printed as text;
* **negative zeros**: ``-0.00`` style numbers in the text.

Needs ``chromium`` on PATH (``apt-get install chromium``); exits 2 when it is missing. tests/test_docs.py runs
it where Chromium exists.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]  # fmt: skip
MARK = "distckpt-docs-probe"

#: runs in the page after layout; its report replaces the page's body so that --dump-dom prints it
PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const report = {overflow: [], empty_headers: [], roles: [], negative_zero: []};
  const describe = (el) => {
    const text = (el.innerText || "").trim().split("\\n")[0].slice(0, 80);
    return `${el.tagName.toLowerCase()}${el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : ""}: ${text}`;
  };
  for (const el of document.querySelectorAll(".md-content *")) {
    const style = getComputedStyle(el);
    if (!["hidden", "clip", "auto", "scroll"].includes(style.overflowX)) continue;
    if (el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0)
      report.overflow.push(`${describe(el)} (content ${el.scrollWidth} px in a ${el.clientWidth} px box, overflow-x ${style.overflowX})`);
  }
  for (const table of document.querySelectorAll(".md-content table")) {
    const heads = [...table.querySelectorAll("thead th")];
    if (heads.length && heads.every(th => !th.innerText.trim())) report.empty_headers.push(describe(table));
  }
  const text = document.querySelector(".md-content") ? document.querySelector(".md-content").innerText : "";
  for (const m of text.matchAll(/:(class|func|mod|meth|attr|data|exc|obj):`[^`]*`/g)) report.roles.push(m[0]);
  for (const m of text.matchAll(/(^|[^\\w.])-0\\.0+(?![\\d])/g)) report.negative_zero.push(m[0].trim());
  const pre = document.createElement("pre");
  pre.id = "MARK";
  pre.textContent = JSON.stringify(report);
  document.body.replaceChildren(pre);
}, 300));
</script>
""".replace("MARK", MARK)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build(site: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                   check=True, cwd=ROOT, env=env)  # fmt: skip


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("index.html") if "assets" not in p.parts and "search" not in p.parts)


def run_chromium(exe: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},1000", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def check_page(exe: str, profile: str, page: Path) -> dict[str, list[str]]:
    """Lay ``page`` out at 1280 px in Chromium and return the probe's findings."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        p = run_chromium(exe, profile, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    start = p.stdout.find(f'<pre id="{MARK}">')
    if start < 0:
        raise RuntimeError(f"{page}: the probe did not report (Chromium exit {p.returncode}): {p.stderr[-500:]}")
    body = p.stdout[start + len(f'<pre id="{MARK}">') : p.stdout.index("</pre>", start)]
    return json.loads(html.unescape(body))


def screenshot(exe: str, profile: str, page: Path, out: Path) -> None:
    run_chromium(exe, profile, f"--screenshot={out}", "--window-size=1280,3000", page.as_uri())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=None, help="check this built site instead of building one")
    ap.add_argument("--shots", type=Path, default=None, help="write a 1280 px PNG of every page here")
    ap.add_argument("--page", action="append", default=None, help="only pages whose path contains this (repeatable)")
    args = ap.parse_args(argv)
    exe = chromium()
    if exe is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="docs-shots-") as tmp:
        site = args.site or Path(tmp) / "site"
        if args.site is None:
            build(site)
        profile = str(Path(tmp) / "profile")
        problems = []
        for page in pages(site):
            rel = page.parent.relative_to(site).as_posix()
            rel = "index" if rel == "." else rel
            if args.page and not any(s in rel for s in args.page):
                continue
            found = check_page(exe, profile, page)
            for kind, items in found.items():
                problems += [f"{rel}: {kind}: {item}" for item in items]
            if args.shots:
                args.shots.mkdir(parents=True, exist_ok=True)
                screenshot(exe, profile, page, args.shots / f"{rel.replace('/', '_')}.png")
            print(f"{rel}: {'ok' if not any(found.values()) else 'PROBLEMS'}")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
