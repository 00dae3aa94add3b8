"""`python -m tests.fuzz [--seconds N] [--dir DIR] [--engine auto|atheris|hypothesis] [TARGET...]`
(`make fuzz`): every target (or those named) for N seconds each, one process per target, then a
table of execs, crashes and seconds per target. Exit status 1 if any target crashed.

The engine is atheris (coverage-guided libFuzzer) when it is installed (`pip install -c
service/constraints.txt -e './service[fuzz]'`; Linux x86-64 wheels only), else Hypothesis's own
generate-and-check engine over the same targets. DIR (default .hypothesis/fuzz, ignored by git)
keeps each target's corpus between runs, its log, and its crashes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.targets import TARGETS

_LIBFUZZER_RUNS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_RESULT = re.compile(r"^FUZZ-RESULT (\{.*\})$", re.MULTILINE)
_CRASH_FILE = re.compile(r"^(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+$")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--dir", type=Path, default=Path(".hypothesis/fuzz"))
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    rows = [_fuzz(name, args.seconds, args.dir / name, engine) for name in args.targets or TARGETS]
    print(f"\n{'target':<16} {'engine':<10} {'execs':>10} {'crashes':>8} {'seconds':>8}  code")
    for name, execs, crashes, seconds in rows:
        print(
            f"{name:<16} {engine:<10} {execs:>10} {crashes:>8} {seconds:>8.1f}  {TARGETS[name][0]}"
        )
    crashed = [name for name, _, crashes, _ in rows if crashes]
    if crashed:
        print(
            f"\ncrashes in {', '.join(crashed)}: inputs and tracebacks under {args.dir}/*/crashes"
        )
    return 1 if crashed else 0


def _fuzz(name: str, seconds: int, folder: Path, engine: str) -> tuple[str, int, int, float]:
    folder.mkdir(parents=True, exist_ok=True)
    crashes = folder / "crashes"
    for old in crashes.glob("*") if crashes.is_dir() else ():
        old.unlink()  # each run reports its own crashes (the corpus is kept)
    argv = [sys.executable, "-m", "tests.fuzz.worker", name, str(seconds), str(folder)]
    print(f"fuzzing {name} for {seconds}s ({engine}) ...", flush=True)
    started = time.monotonic()
    done = subprocess.run(  # our own worker
        [*argv, "--engine", engine],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=seconds + 600,  # setup (the bundled tokenizer, a sealed model) and slack
        check=False,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    (folder / "fuzz.log").write_text(output)
    found = sorted(p.name for p in crashes.glob("*") if _CRASH_FILE.match(p.name))
    for line in output.splitlines():
        if line.startswith("CRASH "):
            print("  " + line)
    if engine == "atheris":
        runs = _LIBFUZZER_RUNS.search(output)
        execs = int(runs.group(1)) if runs else 0
    else:
        result = _RESULT.search(output)
        execs = int(json.loads(result.group(1))["execs"]) if result else 0
    if done.returncode != 0 and not found:  # the worker itself died: that is a crash too
        print(f"  the {name} worker exited with {done.returncode}; see {folder / 'fuzz.log'}")
        found = ["worker"]
    return name, execs, len(found), elapsed


if __name__ == "__main__":
    sys.exit(main())
