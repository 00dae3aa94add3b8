"""A sealed model on the vllm engine: attested boot, key to vLLM's loader only, no plaintext
weight byte on any disk, and every tamper of the sealed files fails the boot with /ready
saying why (the same attacks as tests/sealing/test_tampering.py, now against vLLM's loader)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch

from tdllm.api.boot import BootDeps
from tdllm.sources import open_checkpoint
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_lab.local_service import free_port
from tests.api.test_attested_boot import Broker, seal_test_model
from tests.attestation.simulated_broker import (
    TEST_KEY_ID,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.sealing.sealed_dirs import chunk_span, entry, read_chunk, write_chunk
from tests.vllm.conftest import RunningService, start_service, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore:.*SIMULATED.*")]
PROBE = "model.embed_tokens.weight"  # 56 MB in bf16: many full chunks


@pytest.fixture(scope="module")
def deployment() -> SimulatedDeployment:
    return simulated_deployment()


@pytest.fixture(scope="module")
def broker(deployment: SimulatedDeployment) -> Iterator[Broker]:
    running = Broker(deployment, free_port())
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sealed(deployment: SimulatedDeployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model, sealed in bf16 with the test key (as vLLM will hold it)."""
    out = tmp_path_factory.mktemp("sealed") / "smollm2"
    return seal_test_model(
        deployment, out, checkpoint=open_checkpoint("bundled"), dtype=torch.bfloat16
    )


def sealed_service(
    deployment: SimulatedDeployment, folder: Path, broker: Broker, *, wait: bool = True
) -> RunningService:
    pinned = deployment.write_broker_public_key(folder.parent)
    deps = BootDeps(
        quote_provider=SimulatedProvider(deployment.platform, td_fields()),
        collateral=lambda _quote: deployment.platform.collateral_json(),
    )
    settings = {
        "model": str(folder),
        "attestation": "simulated",
        "allow_simulated": True,
        "broker_url": f"http://127.0.0.1:{broker.port}",
        "broker_public_key": str(pinned),
        "key_id": TEST_KEY_ID,
        "boot_backoff_s": 0.1,
    }
    return start_service(settings, deps, wait=wait)


def needles(folder: Path) -> list[bytes]:
    """Plaintext the disk must never hold: runs of the model's weights as vLLM holds them
    (bf16) and as they were before sealing (fp32), from several tensors."""
    checkpoint = open_checkpoint("bundled")
    wanted = {
        PROBE,
        "model.layers.5.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    }
    found = []
    for name, tensor in checkpoint.tensors():
        if name in wanted:
            row = tensor.reshape(-1)[4096 : 4096 + 32]
            found += [row.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()]
            found += [row.to(torch.float32).view(torch.uint8).numpy().tobytes()]
    assert len(found) == 2 * len(wanted)
    return found


def written_since(start: float, roots: list[Path]) -> Iterator[Path]:
    """Every regular file under `roots` modified since `start`."""
    for root in roots:
        for folder, dirs, files in os.walk(root, onerror=lambda _e: None):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for name in files:
                path = Path(folder, name)
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= start:
                        yield path
                except OSError:
                    continue


def test_sealed_boot_on_vllm_answers_and_leaves_no_plaintext_weight_on_any_disk(
    deployment: SimulatedDeployment, sealed: Path, broker: Broker
) -> None:
    start = time.time() - 1
    running = sealed_service(deployment, sealed, broker)
    try:
        body = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]}
        # the served name is the sealed manifest's; the relay refuses any other
        card = requests.get(running.url + "/v1/models", timeout=10).json()["data"][0]
        body["model"] = card["id"]
        answer = requests.post(
            running.url + "/v1/chat/completions", json=body | {"max_tokens": 8}, timeout=120
        ).json()
        assert answer["usage"]["completion_tokens"] >= 1
        assert "tdllm_receipt" in answer  # attested: the answer is signed as on our engine
        attested = requests.get(running.url + f"/v1/attestation?nonce={'ab' * 32}", timeout=30)
        assert attested.json()["model"]["sealed"]["model_id"]
        _no_key_in_argv_or_environment(running, deployment.data_keys[TEST_KEY_ID])
        # the whole filesystem, /dev/shm included: every file any process wrote during boot
        roots = [Path(p) for p in ("/", "/dev/shm")]
        scanned = [p for p in written_since(start, roots) if not _virtual(p)]
        assert any(str(p).startswith("/dev/shm/tdllm-vllm-") for p in scanned)  # it looked
        plain = needles(sealed)
        for path in scanned:
            try:
                with open(path, "rb") as f:
                    data = f.read(512 << 20)
            except OSError:  # gone since the walk (another process's temporary file)
                continue
            assert not any(n in data for n in plain), f"plaintext weights in {path}"
    finally:
        running.stop()


def _no_key_in_argv_or_environment(running: RunningService, key: bytes) -> None:
    """The key went over the loader channel, nowhere a process listing shows."""
    import base64

    import psutil

    spellings = [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)]
    spellings += [s.rstrip(b"=") for s in spellings[2:]]
    root = psutil.Process(running.backend.process.process.pid)
    for process in [root, *root.children(recursive=True)]:
        for view in ("cmdline", "environ"):
            data = Path(f"/proc/{process.pid}/{view}").read_bytes()
            assert not any(s in data for s in spellings), f"the key in {view} of {process.pid}"


def _virtual(path: Path) -> bool:
    return str(path).startswith(("/proc/", "/sys/", "/dev/")) and not str(path).startswith(
        "/dev/shm/"
    )


def _copy(sealed: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(sealed, folder)
    return folder


def _fails_with(running: RunningService, *words: str) -> str:
    wait_until(lambda: running.service.state.phase == "failed", 600)
    reason = requests.get(running.url + "/ready", timeout=10).json()["reason"]
    running.stop()
    assert all(w in reason for w in words), reason
    return reason


def _flip_a_bit(folder: Path) -> None:
    path, offset, length = chunk_span(folder, PROBE, 1)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x01]))


def _swap_two_chunks(folder: Path) -> None:
    first, second = read_chunk(folder, PROBE, 0), read_chunk(folder, PROBE, 1)
    write_chunk(folder, PROBE, 0, second)
    write_chunk(folder, PROBE, 1, first)


@pytest.mark.parametrize("tamper", [_flip_a_bit, _swap_two_chunks], ids=["bit", "swap"])
def test_tampered_chunks_fail_vllms_load_naming_the_tensor(
    deployment: SimulatedDeployment,
    sealed: Path,
    broker: Broker,
    tmp_path: Path,
    tamper: Callable[[Path], None],
) -> None:
    folder = _copy(sealed, tmp_path)
    tamper(folder)
    running = sealed_service(deployment, folder, broker, wait=False)
    _fails_with(running, "vLLM could not load the model", PROBE)


def test_a_truncated_data_file_fails_the_boot_before_vllm_starts(
    deployment: SimulatedDeployment, sealed: Path, broker: Broker, tmp_path: Path
) -> None:
    folder = _copy(sealed, tmp_path)
    data = folder / entry(folder, PROBE)["file"]
    with open(data, "r+b") as f:
        f.truncate(entry(folder, PROBE)["offset"] + 1000)
    before = set(Path("/dev/shm").glob("tdllm-vllm-*"))
    running = sealed_service(deployment, folder, broker, wait=False)
    _fails_with(running, "cannot open the sealed model", "cannot unseal")  # sizes: manifest
    assert set(Path("/dev/shm").glob("tdllm-vllm-*")) == before


def test_a_model_sealed_under_another_key_never_reaches_vllm(
    deployment: SimulatedDeployment, sealed: Path, broker: Broker, tmp_path: Path
) -> None:
    other = seal_test_model(
        deployment,
        tmp_path / "other",
        checkpoint=open_checkpoint("bundled"),
        dtype=torch.bfloat16,
        data_key=os.urandom(32),
    )
    before = set(Path("/dev/shm").glob("tdllm-vllm-*"))
    running = sealed_service(deployment, other, broker, wait=False)
    _fails_with(running, "cannot open the sealed model")  # the service's own MAC check
    assert set(Path("/dev/shm").glob("tdllm-vllm-*")) == before  # no vLLM was started


def test_a_sealed_directory_swapped_after_the_service_checked_it_fails_vllms_load(
    deployment: SimulatedDeployment, sealed: Path, broker: Broker, tmp_path: Path
) -> None:
    """Time of check, time of use: the host replaces the files after the service verified the
    manifest and before vLLM's loader reads them, with the same model sealed again under the
    same key (valid MACs, another model id). The loader opens only the manifest the service
    verified."""
    folder = _copy(sealed, tmp_path)
    resealed = seal_test_model(
        deployment, tmp_path / "again", checkpoint=open_checkpoint("bundled"), dtype=torch.bfloat16
    )
    running = sealed_service(deployment, folder, broker, wait=False)
    wait_until(lambda: "starting the vLLM engine" in running.service.state.reason, 600)
    shutil.rmtree(folder)
    shutil.copytree(resealed, folder)
    _fails_with(running, "vLLM could not load the model", "cannot unseal manifest")
