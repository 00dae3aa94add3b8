"""`tdllm cluster run`: a worker TD's Ray node under a key holder that attests afresh for each
vLLM stage that loads in it (docs/scale-out.md, "Every stage takes the model key in its own TD").

The stage here is a small script doing what the `tdllm-sealed` loader does in vLLM's worker
(`loader_socket`, `receive_key`, `open_sealed`, `report`); the broker, the quote service and
the CLI are the real ones (simulated TDX). Attacks first: a process of the TD outside the Ray
node's tree asks for the key (nothing); the broker stops releasing the key (the stage gets no
key and the load fails, loudly); the key in any file afterwards (never).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tdllm.cli import main
from tdllm.vllm_engine.loader_channel import NODE_KEY_CHANNEL_ENV, loader_socket, receive_key
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.api.cluster_harness import Cluster, node_config, running_cluster
from tests.attestation.simulated_broker import TEST_KEY_ID, TEST_MODEL, TEST_VERSION
from tests.sealing.synthetic import synthetic_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
TDLLM = str(Path(sys.executable).parent / "tdllm")
# what the tdllm-sealed loader does in a vLLM worker, `loads` times (one connection each)
STAGE = """
import sys, time
from pathlib import Path
from tdllm.sealing.format import ModelVersion
from tdllm.sealing.reader import open_sealed
from tdllm.vllm_engine.loader_channel import loader_socket, receive_key, report

sealed, model, version, loads, go = sys.argv[1:6]
while go != "-" and not Path(go).exists():
    time.sleep(0.05)
for _ in range(int(loads)):
    connection, key = receive_key(loader_socket("/head/loader.sock", sealed=True))
    if not key:
        report(connection, {"failed": "no key came over the loader channel"})
        sys.exit(3)
    checkpoint = open_sealed(Path(sealed), data_key=key, expect=ModelVersion(model, int(version)))
    count = sum(1 for _ in checkpoint.tensors())
    report(connection, {"loaded": count})
    print(count, flush=True)
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from running_cluster(tmp_path)


@pytest.fixture
def node(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A joined worker node with its sealed copy of the model; its settings file."""
    monkeypatch.setenv("TDLLM_ALLOW_SIMULATED_TDX", "1")
    sealed = tmp_path / "sealed"
    seal_checkpoint(
        synthetic_checkpoint(),
        sealed,
        data_key=cluster.deployment.data_keys[TEST_KEY_ID],
        key_id=TEST_KEY_ID,
        model_name=TEST_MODEL,
        model_version=TEST_VERSION,
    )
    config = node_config(cluster, tmp_path / "node2", "10.77.0.2", model=sealed)
    try:
        main(["cluster", "join", "--config", str(config)])
    except SystemExit as exc:
        assert not exc.code, "join failed"
    (tmp_path / "stage.py").write_text(STAGE)
    return config


def _run(config: Path, *child: str) -> subprocess.Popen[str]:
    env = os.environ | {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
    return subprocess.Popen(
        [TDLLM, "cluster", "run", "--config", str(config), "--", *child],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stage(tmp_path: Path, loads: int = 1, go: str = "-") -> list[str]:
    sealed = str(tmp_path / "sealed")
    script = str(tmp_path / "stage.py")
    return [sys.executable, script, sealed, TEST_MODEL, str(TEST_VERSION), str(loads), go]


def _socket(config: Path) -> Path:
    return config.parent / "run" / "stage-keys.sock"


def _wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_each_stage_load_gets_a_freshly_released_key_and_opens_the_sealed_model(
    node: Path, cluster: Cluster, tmp_path: Path
) -> None:
    run = _run(node, *_stage(tmp_path, loads=2))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    tensors = len(list(synthetic_checkpoint().tensors()))
    assert out.split() == [str(tensors), str(tensors)]  # every tensor authenticated, twice
    assert err.count(f"loaded {tensors} tensors") == 2
    assert "2 stage load(s), 0 connection(s) refused" in err
    assert not _socket(node).exists()  # gone with the node
    key = cluster.deployment.data_keys[TEST_KEY_ID]
    for path in tmp_path.rglob("*"):  # the key in no file, raw or hex
        if path.is_file():
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data, path


def test_a_process_outside_the_ray_nodes_tree_gets_no_key(node: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    run = _run(node, *_stage(tmp_path, go=str(go)))
    _wait_for(_socket(node))
    connection, key = receive_key(str(_socket(node)))  # this test is no descendant of the node
    connection.close()
    assert key == bytearray()
    go.touch()
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "1 stage load(s), 1 connection(s) refused" in err


def test_a_stage_gets_no_key_once_the_broker_stops_releasing_it(node: Path, tmp_path: Path) -> None:
    # the owner withdrew the key (here: this node now asks for one the broker does not hold)
    node.write_text(node.read_text().replace(TEST_KEY_ID, "model/withdrawn/1"))
    run = _run(node, *_stage(tmp_path))
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 3  # the stage failed its load, so the node's command did
    assert "no key: the key broker refused" in err
    assert "0 connection(s) refused" in err and "Traceback" not in err


def test_sigterm_stops_the_ray_node_and_removes_the_socket(node: Path) -> None:
    run = _run(node, sys.executable, "-c", "import time; time.sleep(120)")
    _wait_for(_socket(node))
    run.send_signal(signal.SIGTERM)
    _out, err = run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert not _socket(node).exists()


def test_run_before_join_is_one_clear_error(
    cluster: Cluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TDLLM_ALLOW_SIMULATED_TDX", "1")
    config = node_config(cluster, tmp_path / "fresh", "10.77.0.4")
    with pytest.raises(SystemExit) as exc:
        main(["cluster", "run", "--config", str(config), "--", "true"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run `tdllm cluster join` first" in err


@pytest.mark.parametrize(
    ("environ", "sealed", "expected"),
    [
        ({}, True, "/head/loader.sock"),  # one TD: the service's channel
        ({NODE_KEY_CHANNEL_ENV: "/node/stage-keys.sock"}, True, "/node/stage-keys.sock"),
        ({NODE_KEY_CHANNEL_ENV: "/node/stage-keys.sock"}, False, None),  # plain: no one
    ],
)
def test_a_loader_in_a_cluster_node_takes_its_own_tds_socket(
    environ: dict[str, str], sealed: bool, expected: str | None
) -> None:
    assert loader_socket("/head/loader.sock", sealed=sealed, environ=environ) == expected
