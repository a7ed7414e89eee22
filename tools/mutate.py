"""What the tests miss: mutation testing (mutmut) of the modules you name, against the tests you name.

    pip install -e ".[test,mutation]"
    python tools/mutate.py distributed_maml/data/sampler.py --tests tests/test_guards.py tests/test_sampler_learner.py

mutmut puts one small bug at a time into the named modules (an operator flipped, a constant
moved, a call's argument dropped) and runs the named tests against each; a mutant the tests
still pass "survived": a bug of that kind would go unseen. The run happens in a copy of the
tree (git's files, in a temporary folder), so the checkout is untouched and your own edits are
what is mutated. Name the tests that cover the modules (the fast, Ray-free ones where they
exist): every mutant runs them, so minutes per module on a 2-core machine, not CI.

It prints a table (module, mutants, killed, survived, timed out, score) and writes JSON
(`--json`, default mutation.json): the score per module and the survivors (`--diffs`: each one's
diff), to read and either answer with a test or accept with a reason in the issue's closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED = {"killed", "segfault"}  # a timeout is counted apart: a hang is a catch only if it is a real one


def copy_tree(tree: Path, dest: Path) -> None:
    """Git's tracked and untracked-but-not-ignored files of `tree` (the working tree as you have it)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=tree, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for f in files:
        src = tree / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def configure(dest: Path, modules: list[str], tests: list[str], timeout_multiplier: float) -> None:
    """mutmut's settings, appended to the copy's pyproject.toml (mutmut reads them there)."""
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["distributed_maml"]',
        f"only_mutate = {json.dumps(modules)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        # the default tier's tests only; stop a mutant's run at its first failure
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-m", "not slow and not cluster and not gpu"]',
        f"timeout_multiplier = {timeout_multiplier}",
        # a worker forked from a process whose torch thread pool already ran hangs in its first
        # parallel op (every mutant then "times out"): fork from a server that ran no test
        'process_isolation = "forkserver"',
        # + seconds: a mutant's first test also opens the (cached) trained runs, which mutmut's
        # per-test times leave out (too short a limit calls a slow but correct mutant a timeout)
        "timeout_constant = 5.0",
    ]
    with open(dest / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def statuses(dest: Path) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+?)\s*$", out, re.M))


def module_of(mutant: str, modules: list[str]) -> str:
    for m in modules:
        dotted = m.removesuffix(".py").replace("/", ".")
        if mutant.startswith(dotted + "."):
            return m
    return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="+", help="modules to mutate, as paths (distributed_maml/data/sampler.py)")
    ap.add_argument("--tests", nargs="+", required=True, help="the test files (or node ids) that cover them")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout-multiplier", type=float, default=4.0, help="a mutant's time limit, x the clean run's")
    ap.add_argument("--json", default="mutation.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (to run `mutmut browse` there)")
    ap.add_argument("--diffs", action="store_true", help="each survivor's diff in the JSON (a second each)")
    ap.add_argument(
        "--tree", type=Path, default=REPO, help="another checkout to mutate (e.g. a `git worktree` of an older commit)"
    )
    args = ap.parse_args(argv)
    for m in args.modules:
        if not (args.tree / m).is_file():
            print(f"mutate: {m} is not a file of this repository; name modules as paths", file=sys.stderr)
            return 2
    dest = Path(tempfile.mkdtemp(prefix="dmaml-mutate-"))
    start = time.monotonic()
    try:
        copy_tree(args.tree, dest)
        configure(dest, args.modules, args.tests, args.timeout_multiplier)
        # the tests' trained runs are their input data: made once (the clean run), read by every mutant
        env = {**os.environ, "DMAML_TEST_RUNS": str(dest / ".test-runs")}
        run = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
            cwd=dest,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        got = statuses(dest)
        if not got:
            print(f"mutate: mutmut produced no results ({run.stderr.strip()[-300:]})", file=sys.stderr)
            return 1
        survivors = [name for name, s in got.items() if s == "survived"]
        timed_out = sorted(name for name, s in got.items() if s == "timeout")
        show = lambda name: (
            subprocess.run(  # noqa: E731  (about a second each: hundreds take minutes)
                [sys.executable, "-m", "mutmut", "show", name], cwd=dest, capture_output=True, text=True
            ).stdout
        )
        diffs = {name: show(name) if args.diffs else "" for name in survivors}
    finally:
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    rows = {}
    for m in args.modules:
        c = Counter(s for name, s in got.items() if module_of(name, args.modules) == m)
        total = sum(c.values())
        killed = sum(c[s] for s in KILLED)
        rows[m] = {
            "mutants": total,
            "killed": killed,
            "survived": c["survived"],
            "timed_out": c["timeout"],
            "other": {s: n for s, n in c.items() if s not in KILLED | {"survived"}},
            "score": round(killed / total, 3) if total else None,
        }
    width = max(len(m) for m in rows)
    print(f"{'module':<{width}}  mutants  killed  survived  timed out  score")
    for m, r in rows.items():
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"{m:<{width}}  {r['mutants']:>7}  {r['killed']:>6}  {r['survived']:>8}  {r['timed_out']:>9}  {score:>5}")
    result = {
        "modules": rows,
        "tests": args.tests,
        "seconds": round(time.monotonic() - start),
        "survivors": diffs,
        "timed_out": timed_out,  # by name: a hang or a slow mutant, to read (mutmut show NAME) before counting it
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"survivors{' and their diffs' if args.diffs else ''} in {args.json}; {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
