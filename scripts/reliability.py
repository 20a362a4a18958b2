"""Every hostile case of issue #17, run as a user would run it: the `napo` command in a subprocess, on tiny models.

Each case states what must happen and records what did: the exit code, the first line of the message, and the
checks on the output folder (no mixed shards, no temporary file left, a rerun finishing with the rows of an
uninterrupted run). A *crash* is exit code 1 or a Python traceback on stderr; *corruption* is an output that
differs from the uninterrupted run's or mixes two jobs. Cases whose behaviour is being built on another branch are
run too and marked "waits on <branch>" when they do not hold yet.

    python scripts/reliability.py                      # every case, ~10 min on 2 busy cores
    python scripts/reliability.py --only pairs-ctrl-c  # some cases

writes benchmarks/reliability/README.md (the table) and results.json, with the command, date and versions.
Read-only and full-disk cases mount a small tmpfs (root only); elsewhere they are reported as skipped. The cases
are in reliability_cases.py, the models, data files and `napo` runner they share in reliability_fixtures.py, and
the job stalled mid-run that the Ctrl-C and two-jobs cases interrupt in stalled_job.py (which the tests use too).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from reliability_cases import CASES
from reliability_fixtures import ROOT, Lab

from napo.provenance import device_description, utc_now, versions_text, write_json_atomic, write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "reliability"), help="report folder (default: %(default)s)"
    )
    parser.add_argument("--only", nargs="+", default=None, help="case names to run (default: all)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other cases' rows of an existing results.json (default: write only this run's)",
    )
    args = parser.parse_args()
    selected = [c for c in CASES if args.only is None or c[0] in args.only]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        lab = Lab(Path(folder))
        for name, branch, expected, function in selected:
            start = time.perf_counter()
            try:
                outcome = function(lab)
            except Exception as error:  # noqa: BLE001 - a broken case is reported, the others still run
                outcome = {
                    "ok": False,
                    "crash": False,
                    "corruption": False,
                    "observed": f"case could not run: {error!r}"[:400],
                }
            status = (
                "skipped"
                if "skipped" in outcome
                else "pass"
                if outcome["ok"]
                else "FAIL"
                if branch == "cli" or outcome["crash"] or outcome["corruption"]
                else f"waits on {branch} branch"
            )
            row = {
                "case": name,
                "branch": branch,
                "expected": expected,
                "status": status,
                "command": COMMAND,
                "wall_s": round(time.perf_counter() - start, 1),
                **outcome,
            }
            results.append(row)
            print(f"[{status}] {name}: {outcome.get('observed') or outcome.get('skipped')}", flush=True)
    previous = Path(args.out) / "results.json"
    if args.update and previous.exists():
        rerun = {r["case"] for r in results}
        order = [name for name, *_ in CASES]
        recorded = json.loads(previous.read_text())
        kept = [{"command": recorded["command"], **r} for r in recorded["results"] if r["case"] not in rerun]
        results = sorted(kept + results, key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    write_report(Path(args.out), results)


COMMAND = "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_report(out: Path, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    commands = sorted({r.get("command", COMMAND) for r in results})
    meta = {
        "command": "; ".join(commands),
        "date": utc_now(),
        "device": device_description("cpu"),  # every case runs CPU only
        "versions": versions_text(),
        "crashes": sum(bool(r.get("crash")) for r in results),
        "corruption": sum(bool(r.get("corruption")) for r in results),
        "passed": sum(r["status"] == "pass" for r in results),
        "cases": len(results),
    }
    write_json_atomic(out / "results.json", {**meta, "results": results})
    lines = [
        "# Reliability under hostile use (issue #17)",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['device']}; {meta['versions']}.",
        "",
        f"**{meta['passed']} of {meta['cases']} cases hold; {meta['crashes']} crashes (exit 1 or a traceback), "
        f"{meta['corruption']} with corrupted output.** Each case runs the `napo` command in a subprocess on tiny "
        'models built offline (`scripts/reliability.py`); "waits on X branch" marks behaviour being built there.',
        "",
        "| case | expected | observed | status |",
        "|---|---|---|---|",
    ]
    for r in results:
        observed = (r.get("observed") or r.get("skipped") or "").replace("|", "/")
        expected = r["expected"].replace("|", "/")
        lines.append(f"| {r['case']} | {expected} | {observed} | {r['status']} |")
    write_text_atomic(out / "README.md", "\n".join(lines) + "\n")
    print(f"report: {out / 'README.md'}")


if __name__ == "__main__":
    main()
