"""Coverage-guided fuzzing of the parsers that read what an attacker controls (docs/security.md,
"Fuzzing and malformed input").

`targets` defines each target: bytes in, one parser run, and the documented error classes that
may escape it; anything else is a crash. `make fuzz` runs every target for FUZZ_SECONDS under
atheris (libFuzzer) when it is installed, else under Hypothesis's own engine (`python -m
tests.fuzz`); `test_fuzz_smoke.py` runs a few hundred Hypothesis examples of each in `make
test` and keeps every crash found as a regression test.

Nothing from tdllm is imported here: the atheris worker must import it under instrumentation.
"""
