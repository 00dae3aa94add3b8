"""One fuzz target in this process, for a time budget: `python -m tests.fuzz.worker TARGET
SECONDS DIR --engine atheris|hypothesis` (`python -m tests.fuzz` runs every target in one each);
`... TARGET 0 DIR --reproduce FILE...` runs saved inputs once and raises on a crash.

A crash (an error the target does not document) is recorded, not raised: the input goes to
DIR/crashes/crash-<signature> with its traceback beside it, once per signature (the error type
and the innermost frame of project code), and fuzzing goes on. Under atheris, libFuzzer prints
its own statistics (execs) and writes hangs and out-of-memory inputs under DIR/crashes too; the
Hypothesis engine prints one ``FUZZ-RESULT {json}`` line at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTRUMENTED = ["tdllm", "tdllm_attest"]
# inputs starting with this byte (or above) are Hypothesis choice sequences: structured inputs
STRUCTURED = b"\xc0"
PROJECT_CODE = ("/service/src/", "/attestation/src/")


class CrashLog:
    """The distinct crashes of one run, each with the first input that caused it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()

    def record(self, data: bytes, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if any(p in f.filename for p in PROJECT_CODE)] or frames
        where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
        signature = hashlib.sha256(f"{type(exc).__name__} {where}".encode()).hexdigest()[:16]
        if signature in self.seen:
            return
        self.seen.add(signature)
        (self.folder / f"crash-{signature}").write_bytes(data)
        text = "".join(traceback.format_exception(exc))
        (self.folder / f"crash-{signature}.txt").write_text(text)
        print(f"CRASH {type(exc).__name__} at {where} -> crash-{signature}", file=sys.stderr)


def _guarded(check: Callable[[bytes], None], crashes: CrashLog) -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        try:
            check(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # e.g. pyo3's PanicException is a BaseException
            crashes.record(data, exc)

    return one


def _quiet() -> None:
    logging.disable(logging.CRITICAL)  # the service logs every refusal; fuzzing makes millions
    warnings.simplefilter("ignore")


def run_atheris(name: str, seconds: int, folder: Path) -> None:
    import atheris

    _quiet()
    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz.targets import TARGETS

        target = TARGETS[name][1](True)
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in target.seeds:
        (corpus / f"seed-{hashlib.sha256(seed).hexdigest()[:16]}").write_bytes(seed)
    options = [
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        "-timeout=30",
        "-rss_limit_mb=4096",
        f"-max_len={max(4096, *(len(s) for s in target.seeds))}",
        f"-artifact_prefix={folder / 'crashes'}/",
    ]
    if target.dictionary:
        entries = "".join(f'"{_escaped(token)}"\n' for token in target.dictionary)
        (folder / "tokens.dict").write_text(entries)
        options.append(f"-dict={folder / 'tokens.dict'}")
    one = _guarded(target.check, CrashLog(folder / "crashes"))
    structured = _structured(target.strategy, one)

    def entry(data: bytes) -> None:
        if data[:1] >= STRUCTURED:
            structured.hypothesis.fuzz_one_input(data[1:])
        else:
            one(data)

    for i in range(4):  # a start for the structured half of the input space
        (corpus / f"seed-structured-{i}").write_bytes(STRUCTURED + bytes([i * 37]) * 64)
    atheris.Setup([sys.argv[0], *options, str(corpus)], entry)
    atheris.Fuzz()  # exits the process when the time is up


def _structured(strategy: Any, one: Callable[[bytes], None]) -> Any:
    """A Hypothesis test of `strategy` whose choices atheris mutates (fuzz_one_input): libFuzzer's
    coverage guidance over structured inputs (valid-looking requests, manifests) besides raw
    byte mutation."""
    from hypothesis import HealthCheck, given, settings

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def structured(data: bytes) -> None:
        one(data)

    return structured


def _escaped(token: bytes) -> str:
    """A libFuzzer dictionary entry's body: printable ASCII as is, any other byte as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def run_hypothesis(name: str, seconds: int, folder: Path) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.fuzz.targets import TARGETS

    _quiet()
    target = TARGETS[name][1](True)
    crashes = CrashLog(folder / "crashes")
    one = _guarded(target.check, crashes)
    execs = 0

    @settings(
        max_examples=500,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def batch(data: bytes) -> None:
        nonlocal execs
        execs += 1
        one(data)

    started = time.monotonic()
    for seed in target.seeds:
        one(seed)
        execs += 1
    while time.monotonic() - started < seconds:
        batch()
    return {"execs": execs, "crashes": len(crashes.seen), "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("seconds", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="hypothesis")
    parser.add_argument("--reproduce", nargs="+", type=Path, help="run these inputs once, raising")
    args = parser.parse_args()
    if args.reproduce:
        from tests.fuzz.targets import TARGETS

        target = TARGETS[args.target][1](True)
        for path in args.reproduce:
            target.check(path.read_bytes())
            print(f"{path}: no crash")
        return
    if args.engine == "atheris":
        run_atheris(args.target, args.seconds, args.folder)
    result = run_hypothesis(args.target, args.seconds, args.folder)
    print("FUZZ-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
