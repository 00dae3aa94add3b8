"""`tdllm bench soak`: many streaming clients for minutes, with the faults real clients bring.

Each of N clients loops until the deadline, choosing per request (seeded, so a run repeats):
a malformed body (must be a 4xx; a 5xx or a dropped connection is an error), a stream it
abandons after a few chunks (the slot must come back; the server must not care), or a full
streaming chat that must end with a finish reason and ``data: [DONE]`` — one that does not is a
*cut stream*. Clients start evenly over a ramp (10 s by default, as load tools spawn users), so
the numbers are the steady state's, not one synchronized burst's. Reported: requests and errors
by class, completion tokens/s, TTFT p50/p99 of the full streams, the service's RSS (all its
processes) after warm-up (optionally the same load for a while first, unmeasured but with its
errors reported), at the end and at its highest, and `/ready` after the run. Loopback
only: this is a load generator, bounded in clients and minutes, and it refuses to aim at
anything but this machine.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from tdllm.errors import UsageError
from tdllm_lab.bench.serve import streaming_chat_body
from tdllm_lab.local_service import LocalService

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS = 256
MAX_MINUTES = 120.0
CHUNKS_BEFORE_DISCONNECT = 3
RSS_SAMPLE_S = 1.0

# Varied user turns (question, instruction, code, arithmetic, continuation): a soak with one
# repeated prompt would test one prompt length and one cache pattern.
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "List five tips for learning a new language.",
    "What is 17 times 23? Show your working.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Describe the water cycle for a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "Summarise the plot of a detective novel you invent, in three sentences.",
    "Continue this sentence: The old train station at the edge of town",
    "What are the pros and cons of working from home?",
)

# Client mistakes a service must answer with a 4xx: (label, body bytes, content type).
MALFORMED: tuple[tuple[str, bytes, str], ...] = (
    ("not_json", b"{this is not json", "application/json"),
    ("wrong_types", b'{"model": 7, "messages": "hello", "max_tokens": "many"}', "application/json"),
    ("no_messages", b'{"model": "MODEL"}', "application/json"),
    (
        "lone_surrogate",
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
        "application/json",
    ),
    (
        "invalid_utf8",
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',
        "application/json",
    ),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000, "application/json"),
    (
        "huge_number",
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
        "application/json",
    ),
    (
        "negative_tokens",
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
        "application/json",
    ),
    ("form_body", b"model=x&messages=y", "application/x-www-form-urlencoded"),
)


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 32
    minutes: float = 10.0
    max_tokens: int = 64
    disconnect_fraction: float = 0.10
    malformed_fraction: float = 0.05
    seed: int = 0
    ramp_s: float = 10.0  # clients start evenly over this long: a soak measures steady state
    # the same load, unmeasured but checked, before the clock starts: allocator pools, kernel
    # caches and thread arenas reach their working size, so RSS drift shows a leak, not warm-up
    warm_up_s: float = 0.0
    api_key: str | None = field(default=None, repr=False)  # sent, never reported


@dataclass
class Tally:
    """Everything the clients saw; one lock, because 32 threads write it."""

    kinds: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, error: str | None = None, ttft: float = -1.0, tokens: int = 0) -> None:
        with self.lock:
            self.kinds[kind] += 1
            if error is not None:
                self.errors[error] += 1
            if ttft >= 0:
                self.ttfts.append(ttft)
            self.tokens += tokens


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise UsageError(
            f"the soak bench only loads a service on this machine (loopback), not {host!r}"
        )


# -- the three kinds of request -------------------------------------------------------------------


def _open_stream(
    http: requests.Session, url: str, model: str, prompt: str, max_tokens: int
) -> requests.Response:
    return http.post(
        url + "/v1/chat/completions",
        json=streaming_chat_body(model, prompt, max_tokens),
        stream=True,
        timeout=120,
    )


def full_stream(
    http: requests.Session, url: str, model: str, prompt: str, max_tokens: int, tally: Tally
) -> None:
    """A streaming chat read to the end; anything short of finish + [DONE] is an error."""
    start = time.monotonic()
    ttft, tokens, finished, done = -1.0, 0, False, False
    try:
        with _open_stream(http, url, model, prompt, max_tokens) as r:
            if r.status_code != 200:
                tally.add("stream", f"http_{r.status_code}")
                return
            for line in r.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                    continue
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.add("stream", "error_event")
                    return
                for choice in chunk.get("choices", []):
                    if ttft < 0 and choice["delta"].get("content"):
                        ttft = time.monotonic() - start
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except requests.RequestException as exc:
        tally.add("stream", f"cut_stream ({type(exc).__name__})")
        return
    error = None if finished and done else "cut_stream (no finish or [DONE])"
    tally.add("stream", error, ttft, tokens)


def abandoned_stream(
    http: requests.Session, url: str, model: str, prompt: str, max_tokens: int, tally: Tally
) -> None:
    """Read a few chunks, then close the connection as an impatient client does."""
    try:
        with _open_stream(http, url, model, prompt, max_tokens) as r:
            if r.status_code != 200:
                tally.add("disconnect", f"http_{r.status_code}")
                return
            for i, _ in enumerate(r.iter_lines()):
                if i >= CHUNKS_BEFORE_DISCONNECT:
                    break
    except requests.RequestException as exc:
        tally.add("disconnect", f"connection ({type(exc).__name__})")
        return
    tally.add("disconnect")


def malformed(
    http: requests.Session, url: str, model: str, rng: random.Random, tally: Tally
) -> None:
    """A client mistake: the answer must be a 4xx in the OpenAI error shape."""
    label, body, content_type = rng.choice(MALFORMED)
    body = body.replace(b"MODEL", model.encode())
    try:
        r = http.post(
            url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": content_type},
            timeout=60,
        )
    except requests.RequestException as exc:
        tally.add("malformed", f"malformed {label}: connection ({type(exc).__name__})")
        return
    try:
        shaped = isinstance(r.json().get("error"), dict)
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        shaped = False
    if not (400 <= r.status_code < 500 and r.status_code != 429) or not shaped:
        tally.add("malformed", f"malformed {label}: http_{r.status_code}")
    else:
        tally.add("malformed")


# -- the run --------------------------------------------------------------------------------------


def _client(
    url: str, model: str, config: SoakConfig, index: int, deadline: float, tally: Tally
) -> None:
    rng = random.Random(config.seed * 1_000_003 + index)  # noqa: S311  # load mix, not secrets
    time.sleep(config.ramp_s * index / config.clients)
    kind = _first_kind(config, index)
    with session(config) as http:  # one keep-alive connection per client, as real clients hold
        while time.monotonic() < deadline:
            prompt = rng.choice(PROMPTS)
            if kind == "malformed":
                malformed(http, url, model, rng, tally)
            elif kind == "disconnect":
                abandoned_stream(http, url, model, prompt, config.max_tokens, tally)
            else:
                full_stream(http, url, model, prompt, config.max_tokens, tally)
            kind = _next_kind(config, rng.random())


def _next_kind(config: SoakConfig, roll: float) -> str:
    if roll < config.malformed_fraction:
        return "malformed"
    if roll < config.malformed_fraction + config.disconnect_fraction:
        return "disconnect"
    return "stream"


def _first_kind(config: SoakConfig, index: int) -> str:
    """Clients 0, 1, 2 start with a malformed body, an abandoned stream and a full one (when
    their fraction is not 0), so even a short run exercises every kind; the rest start full."""
    wanted = [
        ("malformed", config.malformed_fraction),
        ("disconnect", config.disconnect_fraction),
        ("stream", 1.0),
    ]
    if index < len(wanted) and wanted[index][1] > 0:
        return wanted[index][0]
    return "stream"


def session(config: SoakConfig) -> requests.Session:
    http = requests.Session()
    if config.api_key:
        http.headers["Authorization"] = f"Bearer {config.api_key}"
    return http


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (gunicorn: master + worker)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class RssSampler:
    """Samples a process tree's RSS once a second on a thread of its own."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        if self.pid is not None:
            self.samples.append(_rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _mib(n: int) -> float:
    return round(n / (1 << 20), 1)


def soak(
    url: str, config: SoakConfig, pid: int | None, progress: Callable[[str], None]
) -> dict[str, Any]:
    require_loopback(url)
    with session(config) as http:
        model = http.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        warm = Tally()
        for prompt in PROMPTS[:3]:  # first-call allocations are not drift
            full_stream(http, url, model, prompt, config.max_tokens, warm)
    rss_before_warm_up = _rss_bytes(pid) if pid is not None else 0
    if config.warm_up_s > 0:
        _load(url, model, config, config.warm_up_s, warm, lambda line: progress("warm-up " + line))
    tally = Tally()
    start = time.monotonic()
    with RssSampler(pid) as rss:
        _load(url, model, config, config.minutes * 60, tally, progress)
    wall = time.monotonic() - start
    ready = requests.get(url + "/ready", timeout=10).status_code
    samples = rss.samples or [0]
    rss_start, rss_end = samples[0], samples[-1]
    return {
        "url": url,
        "model": model,
        "config": {k: v for k, v in vars(config).items() if k != "api_key"},
        "wall_s": round(wall, 1),
        "requests": dict(tally.kinds),
        "errors": dict(tally.errors),
        # the warm-up's errors count: unmeasured is not unchecked
        "error_count": sum(tally.errors.values()) + sum(warm.errors.values()),
        "cut_streams": sum(
            n for e, n in (tally.errors + warm.errors).items() if e.startswith("cut_stream")
        ),
        "completion_tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / wall, 1),
        "ttft_p50_s": round(_percentile(tally.ttfts, 0.50), 3),
        "ttft_p99_s": round(_percentile(tally.ttfts, 0.99), 3),
        "rss_start_mib": _mib(rss_start),
        "rss_end_mib": _mib(rss_end),
        "rss_max_mib": _mib(max(samples)),
        "rss_drift_pct": round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start else None,
        "ready_after": ready,
        "warm_up": {
            "seconds": config.warm_up_s,
            "requests": sum(warm.kinds.values()),
            "errors": dict(warm.errors),  # an error is one, measured or not
            "rss_before_mib": _mib(rss_before_warm_up),
        },
    }


def _load(
    url: str,
    model: str,
    config: SoakConfig,
    seconds: float,
    tally: Tally,
    progress: Callable[[str], None],
) -> None:
    """`config.clients` clients (ramped) against `url` for `seconds`, into `tally`."""
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(url, model, config, i, deadline, tally), daemon=True)
        for i in range(config.clients)
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        with tally.lock:
            done, errors = sum(tally.kinds.values()), sum(tally.errors.values())
        left = max(0.0, deadline - time.monotonic())
        progress(f"soak: {done} requests, {errors} errors, {left:.0f}s left")


def run_soak(
    url: str | None,
    config: SoakConfig,
    progress: Callable[[str], None],
    service: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Soak `url`, or a service started on loopback with one KV slot per client and `service`'s
    settings (TDLLM_* names, lower case: model, dtype, ...)."""
    if url is not None:
        return soak(url, config, None, progress)
    slots = str(config.clients)
    settings = {"max_batch": slots, "queue_size": slots} | (service or {})
    local = LocalService()
    local.env.update({"TDLLM_" + k.upper(): v for k, v in settings.items()})
    with local:
        assert local.process is not None  # noqa: S101  # set by __enter__
        report = soak(local.url, config, local.process.pid, progress)
    report["service"] = settings
    return report


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"soak: {c['clients']} clients for {c['minutes']:g} min against {report['model']} "
        f"({c['disconnect_fraction']:.0%} disconnect early, "
        f"{c['malformed_fraction']:.0%} malformed)",
        f"requests {sum(report['requests'].values())} {report['requests']}",
        f"errors   {report['error_count']} {report['errors'] or ''}".rstrip(),
        f"cut streams {report['cut_streams']}",
        f"tok/s {report['tokens_per_s']}  TTFT p50 {report['ttft_p50_s']}s  "
        f"p99 {report['ttft_p99_s']}s",
        f"RSS MiB start {report['rss_start_mib']} end {report['rss_end_mib']} "
        f"max {report['rss_max_mib']} (drift {report['rss_drift_pct']}%)",
        f"/ready after the run: {report['ready_after']}",
    ]
    w = report["warm_up"]
    if w["seconds"]:
        lines.insert(
            1,
            f"warm-up {w['seconds']:g} s first: {w['requests']} requests, errors "
            f"{w['errors'] or 0}, RSS before it {w['rss_before_mib']} MiB",
        )
    return "\n".join(lines)
