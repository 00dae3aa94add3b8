"""The private-model cache trains an entry once, even when two processes ask at the same time."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tdllm_lab.protection import private_cache


def test_concurrent_requests_for_one_entry_train_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[int] = []

    def fake_train(cache: Path, k: int, steps: int, seed: int, log: object) -> Path:
        trained.append(k)
        time.sleep(0.3)  # long enough for the other caller to arrive mid-training
        folder = cache / private_cache.entry_name(k, steps, seed)
        folder.mkdir()
        (folder / private_cache.STAMP).write_text(json.dumps({"k": k}))
        return folder

    monkeypatch.setattr(private_cache, "_train", fake_train)
    results: list[Path] = []
    callers = [
        threading.Thread(
            target=lambda: results.append(private_cache.private_model_dir(tmp_path, 2))
        )
        for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert trained == [2]
    assert results[0] == results[1] == tmp_path / private_cache.entry_name(2)
