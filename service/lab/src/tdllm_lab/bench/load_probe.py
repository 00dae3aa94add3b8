"""One model load in a fresh process, timed: what a TD boot does (`tdllm bench unseal` runs it).

Repeated loads inside one process flatter whichever path recycles freed memory (glibc hands the
previous model's pages back without page faults); a booting TD loads once into fresh memory. The
modules both paths need are imported, and torch warmed up, before the clock starts, so that only
the load is timed. Usage: ``python -m tdllm_lab.bench.load_probe plain|sealed DIR [QUANT]`` with
the data key (hex) on stdin for ``sealed``; QUANT (none, int8, int4; default none) picks the
projections' methods; prints one JSON object.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from tdllm.model.checkpoint import open_hf_directory
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.sealing.reader import open_sealed


def main(argv: list[str]) -> int:
    kind, folder = argv[0], Path(argv[1])
    key = bytearray.fromhex(sys.stdin.readline().strip()) if kind == "sealed" else None
    quant = argv[2] if len(argv) > 2 else "none"
    methods = quant_table(quant) if quant != "none" else None
    torch.zeros(1024).add_(1)  # first-op initialisation outside the clock
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if kind == "sealed":
        model, _ = load_model(open_sealed(folder, data_key=key), torch.float32, methods)
    else:
        model, _ = load_model(open_hf_directory(folder), torch.float32, methods)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    del model
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    faults = after.ru_minflt - before.ru_minflt
    print(json.dumps({"kind": kind, "wall_s": wall, "cpu_s": cpu, "minor_faults": faults}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
