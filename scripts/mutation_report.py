"""Per-module mutation score from a finished ``mutmut run`` (the table in docs/testing.md).

    uv run --with mutmut mutmut run          # mutants of [tool.mutmut] only_mutate
    uv run python scripts/mutation_report.py [--survivors]

Reads mutmut's per-file results (``mutants/<path>.meta``). A mutant counts as killed when a
unit test failed on it or it timed out (the mutant made the code loop: a test would hang
on it, which pytest-timeout turns into a failure). Mutants no selected test runs count
against the score: nothing would notice them.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed"}
TIMEOUTS = {24, -24, 36, 152, 255}
SURVIVED = {0: "survived"}
NO_TESTS = {5, 33}


def status(exit_code: int | None) -> str:
    if exit_code in KILLED:
        return "killed"
    if exit_code in TIMEOUTS:
        return "timeout"
    if exit_code in SURVIVED:
        return "survived"
    if exit_code in NO_TESTS:
        return "no tests"
    return "not checked" if exit_code is None else f"exit {exit_code}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Per-module mutation score from a finished mutmut run."
    )
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list the mutants that lived")
    args = parser.parse_args()
    metas = sorted(args.mutants.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {args.mutants}/: run `mutmut run` first")
        return 1
    print("| module | mutants | killed | timed out | survived | no test | not run | score |")
    print("|---|---|---|---|---|---|---|---|")
    survivors: list[str] = []
    for meta in metas:
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = Counter(status(code) for code in codes.values())
        caught = counts["killed"] + counts["timeout"]
        module = str(meta.relative_to(args.mutants)).removesuffix(".meta")
        score = 100 * caught / len(codes)
        print(
            f"| `{module}` | {len(codes)} | {counts['killed']} | {counts['timeout']} "
            f"| {counts['survived']} | {counts['no tests']} | {counts['not checked']} | {score:.1f} % |"
        )
        survivors += [
            f"{name}: {status(code)}"
            for name, code in codes.items()
            if status(code) in {"survived", "no tests"}
        ]
    if args.survivors:
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
