"""The project's private models, built once by `tdllm finetune-tail` and reused.

`tdllm protect --report`, `tdllm bench split` and the appliance (`make run`) all need the real
private fine-tune of the bundled base (not the perturbed stand-in of `private_model.py`).
Training it takes minutes on a small CPU, so each (K, steps, seed) is trained once into a cache
directory and reused: ``CACHE/zorblax-k{K}-{RECIPE_TAG}-steps{S}-seed{seed}/`` is the model
directory `tdllm finetune-tail --k K --steps S --seed seed` (the default recipe) writes, whose
``finetune.json`` (written last) marks it complete; it is trained under a ``.partial`` name and
renamed, so a half-written directory is never taken for a model. Training is deterministic for
a seed (and thread count), so a cache entry and a fresh run hold the same model.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE = Path(".tdllm") / "private-models"
DEFAULT_STEPS = 40
DEFAULT_SEED = 0
# the default recipe's version (finetune.py): a new recipe gets a new tag, so entries trained by
# an older one are never reused (r1, untagged: facts only, which forgot general ability)
RECIPE_TAG = "r2"
STAMP = "finetune.json"  # finetune.RECORD (not imported: that module pulls in torch)


def entry_name(k: int, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED) -> str:
    return f"zorblax-k{k}-{RECIPE_TAG}-steps{steps}-seed{seed}"


def cached_entry(
    cache: Path, k: int, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED
) -> Path | None:
    """The finished cache entry for (k, steps, seed), or None when it was never built."""
    folder = cache / entry_name(k, steps, seed)
    return folder if (folder / STAMP).is_file() else None


def private_model_dir(
    cache: Path,
    k: int,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """The fine-tuned private model for (k, steps, seed): from the cache, else trained into it."""
    found = cached_entry(cache, k, steps, seed)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    # two processes (a test run and an attack run, say) asking for the same entry: the second
    # waits for the first's training and takes its result instead of racing it on `.partial`
    with (cache / f"{entry_name(k, steps, seed)}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = cached_entry(cache, k, steps, seed)
        if found is not None:
            return found
        return _train(cache, k, steps, seed, log)


def _train(cache: Path, k: int, steps: int, seed: int, log: Callable[[str], None]) -> Path:
    from tdllm.sources import open_checkpoint
    from tdllm_lab.protection.finetune import TrainConfig, finetune_tail

    name = entry_name(k, steps, seed)
    folder, partial = cache / name, cache / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"training the private model {name} once into {cache} ...")
    finetune_tail(
        open_checkpoint("bundled"), partial, TrainConfig(k=k, steps=steps, seed=seed), log
    )  # writes STAMP last
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def training_record(folder: Path) -> dict[str, object]:
    """What `private_model_dir` recorded about the run that made `folder`."""
    record = json.loads((folder / STAMP).read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{folder / STAMP} is not a JSON object")
    return record
