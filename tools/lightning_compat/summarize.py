"""Counts from the JUnit XML files of one test set: stock, plugin, adapted reads, async.

    python tools/lightning_compat/summarize.py RESULTS_DIR SET [--expected FILE]

Reads ``RESULTS_DIR/<SET>-<mode>.xml`` for every mode present. A test *passes stock* when it passed in the
stock run; the other columns count those tests that did not pass (failed or errored) in that mode.
``--expected`` names a file of ``<test id>  # reason`` lines (tests known to fail with the plugin, see
docs/lightning-compat.md); failures not in it are listed as UNEXPECTED, and the exit status is 1 if any
occur in the ``adapted`` or ``async`` mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET

MODES = ("stock", "plugin", "adapted", "async")


WHY: dict[tuple[str, str], str] = {}  # (mode, test) -> first line of the failure message


def outcomes(path: str, mode: str = "") -> dict[str, str]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "")
        nodeid = cls.replace(".", "/") + ".py::" + case.get("name", "")
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            out[nodeid] = "failed"
            bad = next(c for c in case if c.tag in ("failure", "error"))
            WHY[(mode, nodeid)] = (bad.get("message") or "").strip().splitlines()[0][:200] if bad.get("message") else ""
        elif "skipped" in kinds:
            out[nodeid] = "skipped"
        else:
            out[nodeid] = "passed"
    return out


def load_expected(path: str | None) -> dict[str, str]:
    if not path or not os.path.exists(path):
        return {}
    expected = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            test, _, reason = line.partition("#")
            expected[test.strip()] = reason.strip()
    return expected


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("set")
    ap.add_argument("--expected")
    ap.add_argument("--list", action="store_true", help="list every failure, not only unexpected ones")
    ap.add_argument("--why", action="store_true", help="print each listed failure's message")
    ap.add_argument("--json", help="merge this set's counts and failures into this JSON file (docs/lightning-compat.md "
                                   "is rendered from it by benchmarks/report.py)")
    args = ap.parse_args()
    runs = {m: outcomes(p, m) for m in MODES if os.path.exists(p := os.path.join(args.results, f"{args.set}-{m}.xml"))}
    if "stock" not in runs:
        print(f"no stock run for {args.set} in {args.results}", file=sys.stderr)
        return 2
    passing = sorted(t for t, o in runs["stock"].items() if o == "passed")
    expected = load_expected(args.expected)
    print(f"{args.set}: {len(runs['stock'])} collected, {len(passing)} pass stock")
    summary: dict = {"collected": len(runs["stock"]), "pass_stock": len(passing)}
    bad = 0
    for mode, res in runs.items():
        if mode == "stock":
            continue
        failed = [t for t in passing if res.get(t) != "passed"]
        judged = mode in ("adapted", "async")  # the plugin mode fails the tests' own reads: counted, not judged
        unexpected = [t for t in failed if t not in expected] if judged else []
        tail = f" ({len(failed) - len(unexpected)} listed, {len(unexpected)} unexpected)" if judged else ""
        print(f"  {mode:8s} {len(failed):4d} fail{tail}")
        for t in failed if args.list else unexpected:
            tag = "" if t in expected else "UNEXPECTED "
            print(f"      {tag}{t}  [{res.get(t, 'not run')}]")
            if args.why and WHY.get((mode, t)):
                print(f"          {WHY[(mode, t)]}")
        if mode in ("adapted", "async"):
            bad += len(unexpected)
        summary.setdefault("modes", {})[mode] = {"failed": failed, "unexpected": unexpected}
    if args.json:
        write_json(args.json, args.set, summary)
    return 1 if bad else 0


def write_json(path: str, set_: str, summary: dict) -> None:
    import json
    import time

    import lightning

    data = json.load(open(path)) if os.path.exists(path) else {}
    data["lightning"] = lightning.__version__
    data["tests_ref"] = os.environ.get("LIGHTNING_REF", "2.6.5")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
    from _common import git_commit  # the commit of lightning-distckpt these tests ran against

    data.setdefault("sets", {})[set_] = {**summary, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit()}
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
