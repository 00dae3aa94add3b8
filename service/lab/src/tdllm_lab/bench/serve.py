"""`tdllm bench serve`: N concurrent streaming clients against the service on loopback.

Each client sends `requests_per_client` streaming chat requests back to back (ignore_eos is not
an API field, so a fixed prompt asking for a long answer keeps generations near max_tokens);
aggregate tokens/s is total completion tokens over wall time, TTFT is request start to the first
content chunk, p50/p95 over all requests at that concurrency.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import requests

from tdllm_lab.local_service import LocalService

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


def _level(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            result = _one_request(url, model, max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
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
    }


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
