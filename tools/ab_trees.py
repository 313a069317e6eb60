"""A/B of one benchmark across two checkouts, interleaved in one session.

Runs `python <tree>/<script> <args> --markdown` in tree A, then B, then A, ... (--rounds each), with
PYTHONPATH set to the tree, parses the markdown rows `| measurement | value | ... | ratio |` that
bench_pipeline.py prints, and prints for every row (its value, and its ratio to the run's own
baseline where it has one) the median of each tree and B / A. The
interleaving spreads a busy machine's noise over both trees; the spread of each tree's own runs is
printed beside it, so a difference inside it reads as noise. Ratios are "%" (to the copy alone)
or "x" (a latency to its transport floor). --script-tree runs one checkout's script in both trees,
for rows a benchmark newer than A's prints.

    python tools/ab_trees.py --a /path/to/base --b . --rounds 3 -- bench/bench_pipeline.py \
        --total-mib 256 --latency-n 500 --batches 1,64,256 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROW = re.compile(r"^\| (?P<name>[^|]+?) \| (?P<value>[^|]+?) \|[^|]*\| *(?P<ratio>[0-9.]+[%x])? *\|")
NUMBER = re.compile(r"(?:p50 )?(?P<num>[0-9.]+) (?P<unit>GB/s|us|s/GB)")


def run(tree: str, script: list[str], script_tree: str | None = None) -> dict[str, tuple[float, str]]:
    # The tree first; what PYTHONPATH already names (e.g. carried wheels) stays behind it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.abspath(tree),
                                                                     os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.join(script_tree or tree, script[0]), *script[1:], "--markdown"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        n = NUMBER.search(m.group("value")) if m else None
        if n:
            rows[m.group("name")] = (float(n.group("num")), n.group("unit"))
        if m and m.group("ratio"):   # the row's own ratio to its same-run baseline (copy alone: %, floor: x)
            ratio = m.group("ratio")
            rows[m.group("name") + ", ratio to its baseline"] = (float(ratio[:-1]), ratio[-1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", required=True, help="checkout B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--script-tree", default=None,
                    help="run the script of this checkout in both trees (a benchmark newer than A's)")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- script path (relative to each tree) and args")
    args = ap.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for i in range(args.rounds):
        for key in ("a", "b"):
            tree = getattr(args, key)
            print(f"round {i + 1}/{args.rounds}: {key} = {tree}", file=sys.stderr, flush=True)
            runs[key].append(run(tree, script, args.script_tree))
    print("| measurement | A median (min-max) | B median (min-max) | B / A |")
    print("|---|---|---|---|")
    for name in runs["a"][0]:
        a = [r[name][0] for r in runs["a"] if name in r]
        b = [r[name][0] for r in runs["b"] if name in r]
        if not a or not b:
            continue
        unit = runs["a"][0][name][1]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {name} | {ma:g} {unit} ({min(a):g}-{max(a):g}) | {mb:g} {unit} ({min(b):g}-{max(b):g}) "
              f"| {mb / ma:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
