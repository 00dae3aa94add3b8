"""`tdllm bench serve`: N concurrent streaming clients against the service on loopback.

Each client sends `requests_per_client` streaming chat requests back to back (ignore_eos is not
an API field, so a fixed prompt asking for a long answer keeps generations near max_tokens);
aggregate tokens/s is total completion tokens over wall time, TTFT is request start to the first
content chunk, p50/p95/p99 over all requests at that concurrency.

With `engines` (`--engine tdllm,vllm,vllm-alone`) one run compares engines side by side, one at
a time on the same model, prompt, dtype and max_batch, each stopped fully before the next:
`tdllm` is the service on our engine, `vllm` the service with engine=vllm (our front relaying to
vLLM's OpenAI server on a Unix socket), `vllm-alone` vLLM's server started as the service starts
it (same model directory, loader plugin, args and KV size) but on 127.0.0.1 with no front, so
`vllm / vllm-alone` is what the front costs. `tdllm-QUANT` (`tdllm-int8`, `tdllm-w8a8`, ...: one
per quant) is the service on our engine with that `quant` (weights quantized at load).
Peak RSS is the largest sampled sum of the RSS of every process in the server's tree (service,
gunicorn worker, vLLM and its engine processes), sampled with psutil every RSS_SAMPLE_S during
each concurrency level; pages shared between forked processes count once per process, so for
vLLM it overstates; `pss_mib` (proportional set size, taken once after each level) does not.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tdllm.errors import UsageError
from tdllm.model.quant_formats import QUANTS
from tdllm_lab.local_service import LocalService, free_port

# tdllm-<quant>: our engine with that `quant` setting, one per quant
ENGINES = ("tdllm", *(f"tdllm-{q}" for q in QUANTS if q != "none"), "vllm", "vllm-alone")
VLLM_PYTHON_ENV = "TDLLM_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")  # `make vllm`, from the repository root
VLLM_START_S = 900.0
RSS_SAMPLE_S = 0.25
_MIB = 1 << 20

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def streaming_chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The request both load benches send: one user turn, sampled, streamed with usage."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _one_request(url: str, model: str, max_tokens: int) -> tuple[float, int]:
    body = streaming_chat_body(model, PROMPT, max_tokens)
    start = time.monotonic()
    ttft = -1.0
    tokens = 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft < 0 and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.monotonic() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _level(
    url: str,
    model: str,
    clients: int,
    per_client: int,
    max_tokens: int,
    tree: Callable[[], list[Any]] | None = None,
) -> dict[str, Any]:
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            result = _one_request(url, model, max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    sampler = RssSampler(tree).start() if tree is not None else None
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    memory = sampler.stop() if sampler is not None else {}
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(_percentile(ttfts, 0.95), 3),
        "ttft_p99_s": round(_percentile(ttfts, 0.99), 3),
    } | memory


def run_serve_bench(
    url: str | None, counts: list[int], per_client: int, max_tokens: int
) -> dict[str, Any]:
    if url is None:
        with LocalService(max_batch=str(max(counts)), queue_size="16") as service:
            return run_serve_bench(service.url, counts, per_client, max_tokens)
    model = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    _one_request(url, model, 8)  # warm-up
    levels = [_level(url, model, n, per_client, max_tokens) for n in counts]
    return {"url": url, "model": model, "max_tokens": max_tokens, "levels": levels}


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}, max_tokens {report['max_tokens']}, streaming chat",
        f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} "
        f"{'TTFT p50':>9} {'TTFT p95':>9}",
    ]
    for level in report["levels"]:
        lines.append(
            f"{level['clients']:>7} {level['requests']:>8} {level['completion_tokens']:>7} "
            f"{level['tokens_per_s']:>8} {level['ttft_p50_s']:>8}s {level['ttft_p95_s']:>8}s"
        )
    return "\n".join(lines)


class RssSampler:
    """Peak of the summed RSS of a process tree, sampled on a thread until `stop`."""

    def __init__(self, tree: Callable[[], list[Any]]) -> None:
        self.psutil = _psutil()
        self.tree = tree
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except self.psutil.Error:  # exited between listing and reading
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._done.wait(RSS_SAMPLE_S):
            self.sample()

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        self.sample()
        pss = 0
        for process in self.tree():
            try:
                pss += process.memory_full_info().pss
            except (self.psutil.Error, AttributeError):
                pass
        return {
            "peak_rss_mib": round(self.peak / _MIB, 1),
            "pss_mib": round(pss / _MIB, 1),
            "processes": len(self.tree()),
        }


def process_tree(pid: int) -> Callable[[], list[Any]]:
    """The process `pid` and all its descendants, listed afresh on each call."""
    psutil = _psutil()
    root = psutil.Process(pid)

    def tree() -> list[Any]:
        try:
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    return tree


def _psutil() -> Any:
    """psutil (in the lab's environment, not a dependency of the service)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError("--engine measures memory with psutil: pip install psutil") from None
    return psutil


def parse_engines(text: str) -> list[str]:
    """`tdllm,vllm,vllm-alone` -> the engines in the order given, each once."""
    engines: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item not in ENGINES:
            raise UsageError(f"--engine: unknown engine {item!r} (one of {', '.join(ENGINES)})")
        if item not in engines:
            engines.append(item)
    if not engines:
        raise UsageError(f"--engine: name at least one of {', '.join(ENGINES)}")
    return engines


def parse_counts(text: str) -> list[int]:
    """`1,8,32` -> [1, 8, 32]; each a positive integer."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--clients: a comma-separated list of integers, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise UsageError("--clients: at least one count, each >= 1")
    return counts


def vllm_python(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
    """TDLLM_VLLM_PYTHON, else .venv-vllm/bin/python under the current directory (the repo)."""
    env = os.environ if environ is None else environ
    configured = env.get(VLLM_PYTHON_ENV)
    path = Path(configured) if configured else (cwd or Path.cwd()) / DEFAULT_VLLM_PYTHON
    if not path.exists():
        raise UsageError(
            f"the vllm engines need vLLM's python: {path} does not exist "
            f"(run `make vllm`, or set {VLLM_PYTHON_ENV})"
        )
    return path.absolute()  # not resolved: the venv's python is a symlink to the base one


@contextmanager
def _served(
    engine: str, model: str, dtype: str, max_batch: int, python: Path | None
) -> Iterator[tuple[str, int]]:
    """Start one engine, yield (its base URL, the root pid of its process tree), stop it."""
    ours = engine.startswith("tdllm")
    changes = {
        "model": model,
        "dtype": dtype,
        "max_batch": str(max_batch),
        "queue_size": "16",
        "engine": "tdllm" if ours else "vllm",
        "quant": engine.removeprefix("tdllm-") if engine.startswith("tdllm-") else "none",
        "vllm_args": "",  # vLLM's defaults (no --enforce-eager), whatever the environment says
    }
    if not ours:
        assert python is not None  # noqa: S101  # vllm_python() ran for the vLLM engines
        changes |= {"vllm_python": str(python), "vllm_start_timeout_s": str(VLLM_START_S)}
    if engine != "vllm-alone":
        with LocalService(ready_timeout_s=VLLM_START_S + 60, log=None, **changes) as service:
            assert service.process is not None  # noqa: S101  # started by __enter__
            yield service.url, service.process.pid
        return
    from tdllm.settings import load_settings, service_environment

    settings = load_settings(environ=service_environment(None, **changes))
    process = _start_vllm_alone(settings)
    try:
        assert process.process is not None  # noqa: S101  # started
        yield f"http://127.0.0.1:{process.launch.tcp_port}", process.process.pid
    finally:
        process.stop()


def _start_vllm_alone(settings: Any) -> Any:
    """vLLM's server as `tdllm.api.boot.Boot._start_vllm` starts it (plain model), on TCP."""
    from tdllm.api.vllm_start import vllm_launch
    from tdllm.sources import open_checkpoint
    from tdllm.vllm_engine.child import VllmProcess

    checkpoint = open_checkpoint(settings.model)
    launch = vllm_launch(settings, checkpoint, tcp_port=free_port())
    process = VllmProcess(launch)
    with _quiet_children():
        process.start(checkpoint, None)
    process.wait_ready(settings.vllm_start_timeout_s)
    return process


@contextmanager
def _quiet_children() -> Iterator[None]:
    """Children started inside inherit /dev/null as stdout and stderr (as under LocalService),
    so vLLM's log stays out of the report (`--json > file`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def run_engines_bench(
    engines: list[str],
    counts: list[int],
    per_client: int,
    max_tokens: int,
    *,
    model: str = "bundled",
    dtype: str = "bf16",
    max_batch: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Each engine in turn: start it, warm up, every client count, stop it fully."""
    _psutil()
    python = vllm_python() if any(not e.startswith("tdllm") for e in engines) else None
    batch = max_batch or max(counts)
    runs: list[dict[str, Any]] = []
    served_model = ""
    for engine in engines:
        if progress is not None:
            progress(f"starting {engine}")
        started = time.monotonic()
        with _served(engine, model, dtype, batch, python) as (url, pid):
            start_s = round(time.monotonic() - started, 1)
            served_model = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            _one_request(url, served_model, 8)  # warm-up
            tree = process_tree(pid)
            levels = []
            for n in counts:
                if progress is not None:
                    progress(f"{engine}: {n} clients")
                level = _level(url, served_model, n, per_client, max_tokens, tree)
                if level["requests"] != n * per_client:  # a client thread died: no numbers
                    failed = n * per_client - level["requests"]
                    raise RuntimeError(f"{engine}, {n} clients: {failed} requests failed")
                levels.append(level)
            processes = tree()
        _wait_gone(engine, processes)  # stopped fully (vLLM's engine processes too) before the next
        runs.append({"engine": engine, "url": url, "start_s": start_s, "levels": levels})
    return {
        "mode": "engines",
        "model": served_model,
        "dtype": dtype,
        "max_batch": batch,
        "max_tokens": max_tokens,
        "requests_per_client": per_client,
        "vllm_args": [],
        "rss": f"psutil: peak summed RSS of the server process tree, sampled every {RSS_SAMPLE_S}s",
        "engines": runs,
    }


def _wait_gone(engine: str, processes: list[Any], timeout_s: float = 90.0) -> None:
    _, alive = _psutil().wait_procs(processes, timeout=timeout_s)
    if alive:
        pids = ", ".join(str(p.pid) for p in alive)
        raise RuntimeError(f"{engine}: processes {pids} still running {timeout_s:g}s after stop")


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def format_engines_report(report: dict[str, Any]) -> str:
    """One row per (client count, engine); ratios against the vllm-alone and tdllm rows."""
    by_engine = {
        run["engine"]: {lv["clients"]: lv for lv in run["levels"]} for run in report["engines"]
    }
    lines = [
        f"model {report['model']}, {report['dtype']}, max_batch {report['max_batch']}, "
        f"max_tokens {report['max_tokens']}, {report['requests_per_client']} requests per client, "
        "streaming chat",
        "starts: " + ", ".join(f"{r['engine']} {r['start_s']}s" for r in report["engines"]),
        f"{'clients':>7} {'engine':<10} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'peak RSS':>9} {'PSS':>8} | {'tok/s vs':>8} {'p50 vs':>7} {'RSS vs':>7} "
        f"| {'tok/s vs':>8} {'p50 vs':>7} {'RSS vs':>7}",
        f"{'':>7} {'':<10} {'':>7} {'':>9} {'':>9} {'MiB':>9} {'MiB':>8} | "
        f"{'vllm-alone':>24} | {'tdllm':>24}",
    ]
    counts = sorted({c for levels in by_engine.values() for c in levels})
    for clients in counts:
        alone = by_engine.get("vllm-alone", {}).get(clients)
        ours = by_engine.get("tdllm", {}).get(clients)
        for run in report["engines"]:
            lv = by_engine[run["engine"]].get(clients)
            if lv is None:
                continue
            ratios = []
            for base in (alone, ours):
                ratios.append(
                    f"{_ratio(lv['tokens_per_s'], base and base['tokens_per_s']):>8} "
                    f"{_ratio(lv['ttft_p50_s'], base and base['ttft_p50_s']):>7} "
                    f"{_ratio(lv['peak_rss_mib'], base and base['peak_rss_mib']):>7}"
                )
            lines.append(
                f"{clients:>7} {run['engine']:<10} {lv['tokens_per_s']:>7} "
                f"{lv['ttft_p50_s']:>8}s {lv['ttft_p99_s']:>8}s {lv['peak_rss_mib']:>9} "
                f"{lv['pss_mib']:>8} | {ratios[0]} | {ratios[1]}"
            )
    lines.append(report["rss"] + "; PSS once after each level")
    return "\n".join(lines)
