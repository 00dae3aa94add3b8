"""`tdllm bench` stopped by SIGTERM (`timeout`, a job runner) takes the worker process it started
with it: an orphaned worker kept loading and decoding on the machine's cores, under whatever
was measured next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.processes import children, running

WORKER = "tdllm_lab.bench.engine_worker"


def test_a_terminated_bench_takes_its_worker_with_it() -> None:
    bench = subprocess.Popen(
        [sys.executable, "-c", "from tdllm.cli import main; main()", "bench", "--engine", "ours",
         "--dtype", "fp32", "--repeats", "50", "--new-tokens", "4096"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.1)
            workers = [pid for pid, cmd in children(bench.pid) if WORKER in cmd]
        assert workers, "the bench never started its worker"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(workers[0]), "the worker outlived its bench"
    finally:
        bench.kill()
        bench.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
