"""Service configuration, resolved once: defaults -> TOML file -> ``TDLLM_*`` environment -> test
overrides, into one frozen, validated `Settings`.

This is the only module of the service that reads ``os.environ``: everything else receives a
`Settings`, so a test can build any configuration without touching the process environment and
a running service cannot change its mind halfway through.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from tdllm.errors import UsageError
from tdllm.model.compile_modes import COMPILE_MODES, NOT_GROUPED_QUANTS
from tdllm.model.quant_formats import QUANTS  # weight-only quantization at load

ENV_PREFIX = "TDLLM_"
CONFIG_ENV = "TDLLM_CONFIG"  # path of the TOML file, when not given explicitly
ALLOW_SIMULATED_ENV = "TDLLM_ALLOW_SIMULATED_TDX"  # the same switch the attestation side demands
ATTESTATION_MODES = ("none", "tdx", "simulated")
DTYPES = ("fp32", "bf16")
ENGINES = ("tdllm", "vllm")
GPU_CC = "gpu-cc"  # vLLM on a confidential-computing GPU inside the trust boundary
GPU_EVIDENCE_SOURCES = ("nvml", "simulated")
# a prefill chunk walks all the weights as a decode step does: fewer tokens than this would
# spend most of each step reading weights for almost no prompt
MIN_PREFILL_CHUNK = 16


class SettingsError(UsageError):
    """The configuration is inconsistent or names an unknown setting; the service will not start."""


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to know about its deployment (see docs/api.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # 'bundled', a .gguf file, a Hugging Face directory (dev), or a sealed model directory
    model: str = "bundled"
    served_model_name: str | None = None  # the `model` id clients see; default: the model's name
    dtype: str = "fp32"
    # weights quantized at load, kept int8/int4 and multiplied by PyTorch's weight-only CPU
    # kernels (activations stay `dtype`), or w8a8: int8 weights and activations rounded to int8
    # per row, FBGEMM (VNNI CPUs), or w8a8-onednn: the same on oneDNN's int8 GEMM (AMX: faster
    # prefill and batches, slower at one sequence), or w8a8-avx512: on our AVX-512 VNNI kernel
    # (faster decode, slower prefill; built at first use: a C++ compiler), or w8a8-avx2: int8
    # weights and inputs with a scale per 32 on our AVX2 kernel (likewise), or w4a8: int4
    # weights times inputs rounded to int8 per 32 on our kernel (AVX-512 VNNI where the CPU has
    # it, else AVX2; likewise), w4a8-avx512: on the AVX-512 one only; engine tdllm,
    # profile td-only (every projection) or split (its private tail and lm_head)
    # (docs/performance.md)
    quant: str = "none"
    # "decode": the tdllm engine's decode step compiled by TorchInductor at load, two graphs
    # (one row, more rows) (1.25-1.48x faster steps for the bundled model in bf16, 1.5-1.9x at
    # one int4 sequence; 3-7 minutes of start-up on 2 cores; needs g++; td-only and split,
    # docs/performance.md "Compiled decode step"); "decode-groups": one graph every group of
    # blocks shares (~1 minute of start-up, steps 1.0-1.2x as long as decode's on the bundled
    # model, 1.1x eager's and 0.94x decode's at 1B; quant int8, int4, w8a8-avx2,
    # w4a8(-avx512) or fp32;
    # "Compiled a group of blocks at a time"); "off": eager. Not applied (logged) where every
    # block runs in one op on our AVX2 kernels, which is faster ("One call a block")
    compile: str = "off"
    # protection profile of the served model (docs/security.md): td-only | split (| ...);
    # `device` is the untrusted device of offloading profiles, `k` the private tail length,
    # `public_ref` a public-prefix.json from `tdllm prepare` (default: the pinned bundled base)
    profile: str = "td-only"
    device: str = "cpu"
    k: int = 2
    public_ref: str | None = None
    # which engine runs the model: ours (every protection profile) or vLLM's OpenAI server as
    # a child process behind this front (td-only; docs/vllm.md). `vllm_python` is the python
    # of the vLLM virtual environment (`make vllm`: .venv-vllm/bin/python), `vllm_args` extra
    # vLLM options from an allow-list (tdllm.vllm_engine.args)
    engine: str = "tdllm"
    vllm_python: str | None = None
    vllm_args: tuple[str, ...] = ()
    vllm_start_timeout_s: float = 900.0
    # profile "gpu-cc": where the GPUs' attestation evidence comes from: "nvml" (NVIDIA's
    # driver, CC mode on) or "simulated" (an UNSAFE synthetic GPU; attestation 'simulated' only)
    gpu_evidence: str = "nvml"
    # per-token log-probabilities help a client rebuild the model's last layers and distil a
    # private tail (docs/security.md, A15): "off" (default) refuses them, "top-k:N" allows up to
    # N alternatives (N <= 20), on both engines (tdllm.api.openai.logprobs)
    logprobs_policy: str = "off"
    # sequences decoded together (KV-cache slots); a slot holds memory only for the tokens its
    # sequence wrote, so many slots of the whole context cost what is in use (kv_cache_tokens)
    max_batch: int = 32
    # prompt tokens one engine step prefills at most (tdllm engine): a longer prompt is
    # prefilled in chunks between decode steps, so running streams wait one chunk, not the
    # whole prompt, for their next token (docs/performance.md, "Chunked prefill"); 0: whole
    # prompts, as they arrive
    prefill_chunk: int = 512
    # blocks of 64 prompt tokens whose keys and values the tdllm engine keeps after a prefill,
    # so a later prompt starting with the same blocks (a shared system prompt) prefills only the
    # rest (td-only models; docs/performance.md, "Prefix cache"). Kept per API key: one key's
    # clients never hit another's blocks (docs/security.md); memory only for blocks kept; 0: off
    prefix_cache_blocks: int = 128
    # most choices one request may ask for: n, or prompts times n for a list prompt (each choice
    # is a sequence: a KV-cache slot); a prompt's n choices decode together, so n <= max_batch too
    max_n: int = 8
    # KV-cache length per slot: prompt + completion (the model's own context at most: 8192 for
    # SmolLM2)
    context_tokens: int = 8192
    max_prompt_tokens: int = 0  # 0: any prompt the context holds with room for one token
    # KV-cache positions all running sequences may hold together (tdllm engine): a request is
    # admitted while its prompt plus max_tokens, per choice, fits what is left, so the cache's
    # memory stays under this many tokens' keys and values (docs/performance.md, "KV pages on
    # demand"); 0: every slot its whole context (max_batch x context_tokens)
    kv_cache_tokens: int = 65536
    max_tokens_limit: int = 1024  # largest `max_tokens` a request may ask for
    default_max_tokens: int = 256  # chat requests without max_tokens
    queue_size: int = 32  # requests waiting beyond the running batch before 429
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    # a client must send its request line, headers and body within this many seconds of its
    # first byte, else gunicorn_conf's worker drops it: a slow client cannot keep a thread
    request_read_timeout_s: float = 30.0
    api_keys: tuple[str, ...] = ()  # empty: no authentication (loopback/dev)
    # sealed models: how the data key is obtained
    attestation: str = "none"  # none | tdx | simulated
    broker_url: str | None = None
    key_id: str | None = None
    model_id: str | None = None  # pin the sealed model (refuse any other)
    # PEM file of the key broker's Ed25519 public key, pinned in the measured image: the TD
    # takes a key only from an answer signed by it (the host cannot stand in for the broker)
    broker_public_key: str | None = None
    # the oldest sealed model version this image will serve: a key released for an older one
    # (a rollback to a known-flawed model) is refused even if the broker lets it go
    min_model_version: int = 1
    # a node of a multi-TD vLLM cluster (docs/scale-out.md): its address on the WireGuard
    # overlay. The key release then also asks the broker for a node certificate (bound into the
    # quote) and writes it, with the node's TLS and WireGuard keys, to `cluster_dir` (memory)
    cluster_address: str | None = None
    cluster_dir: str = "/run/tdllm/cluster"
    allow_simulated: bool = False  # from TDLLM_ALLOW_SIMULATED_TDX=1, never from the file
    # simulated mode only: the host's UNSAFE simulated quote service (tdllm_attest.testing.qgs)
    # instead of an in-process test PKI, so a broker on the host can trust the same platform
    simulated_quote_url: str | None = None
    # the host's PCCS (Intel PCS API v4): where /v1/attestation gets the collateral it serves
    # with a quote; clients re-check its freshness themselves, the broker fetches its own
    pccs_url: str | None = None
    boot_attempts: int = 8
    boot_backoff_s: float = 1.0
    boot_backoff_max_s: float = 30.0
    # client attestation: the path of the runtime (RTMR3) event log the image's extender keeps
    # (JSON, tdllm_attest.eventlog.parse_runtime_log) and the id of the reference-values
    # document this deployment is checked against; /v1/attestation returns both
    runtime_log: str | None = None
    reference_values_id: str | None = None
    # end-to-end streams: one sealed record per tick of this many ms, carrying every chunk made
    # since the last one, so the host sees token counts and timing only per tick (0: one record
    # per chunk, for tests)
    e2e_record_interval_ms: int = 200
    threads: int = 32  # gunicorn gthread threads in the single worker
    # SIGTERM/SIGINT: how long requests already running may take to finish before they are
    # ended (docs/api.md, "Shutdown"); gunicorn's graceful_timeout is this plus a margin
    drain_timeout_s: float = 20.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not (0 < self.port < 65536):
            problems.append("port must be in 1..65535")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}")
        problems += _quant_problems(self)
        problems += _compile_problems(self)
        for name in (
            "max_batch",
            "max_n",
            "context_tokens",
            "max_tokens_limit",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.prefill_chunk != 0 and self.prefill_chunk < MIN_PREFILL_CHUNK:
            problems.append(
                f"prefill_chunk must be 0 (whole prompts) or at least {MIN_PREFILL_CHUNK} tokens"
            )
        if self.prefix_cache_blocks < 0:
            problems.append("prefix_cache_blocks must be 0 (off) or a count of 64-token blocks")
        if not (0 <= self.max_prompt_tokens < self.context_tokens):
            problems.append("max_prompt_tokens must be 0 (the context's) or below context_tokens")
        if self.kv_cache_tokens != 0 and self.kv_cache_tokens < self.context_tokens:
            problems.append(
                "kv_cache_tokens must be 0 (every slot's whole context) or at least "
                "context_tokens (one whole sequence)"
            )
        if not (1 <= self.default_max_tokens <= self.max_tokens_limit):
            problems.append("default_max_tokens must be in 1..max_tokens_limit")
        if self.queue_size < 0 or self.max_body_bytes < 1024 or self.threads < 1:
            problems.append("queue_size >= 0, max_body_bytes >= 1024 and threads >= 1")
        if self.boot_attempts < 1 or self.boot_backoff_s < 0 or self.request_timeout_s <= 0:
            problems.append("boot_attempts >= 1, boot_backoff_s >= 0, request_timeout_s > 0")
        if self.request_read_timeout_s <= 0:
            problems.append("request_read_timeout_s must be > 0")
        if self.attestation not in ATTESTATION_MODES:
            problems.append(f"attestation must be one of {', '.join(ATTESTATION_MODES)}")
        if self.attestation == "simulated" and not self.allow_simulated:
            problems.append(f"attestation 'simulated' also needs {ALLOW_SIMULATED_ENV}=1")
        if self.pccs_url is not None and not self.pccs_url.startswith(("https://", "http://")):
            problems.append("pccs_url must be an http(s) URL")
        if self.simulated_quote_url is not None and self.attestation != "simulated":
            problems.append("simulated_quote_url needs attestation 'simulated'")
        if self.sealed and self.attestation == "none":
            problems.append("a broker_url needs attestation 'tdx' or 'simulated'")
        if self.sealed and not self.key_id:
            problems.append("a broker_url needs key_id (the sealed model's key at the broker)")
        if self.sealed and not self.broker_public_key:
            problems.append(
                "a broker_url needs broker_public_key (the PEM file of the broker's pinned "
                "Ed25519 key; without it any host could answer as the broker)"
            )
        problems += _cluster_problems(self)
        if not (1 <= self.min_model_version <= 2**53 - 1):
            problems.append("min_model_version must be an integer from 1 to 2**53-1")
        rv_id = self.reference_values_id
        if rv_id is not None and not (0 < len(rv_id) <= 200 and rv_id.isprintable()):
            problems.append("reference_values_id must be 1..200 printable characters")
        if self.profile == GPU_CC:
            problems += _gpu_cc_problems(self)
        elif self.profile != "td-only" or self.device != "cpu":
            problems += _protection_problems(self.profile, self.device)
        problems += _engine_problems(self)
        if not (0 <= self.drain_timeout_s <= 3600):
            problems.append("drain_timeout_s must be in 0..3600")
        if not (0 <= self.e2e_record_interval_ms <= 10_000):
            problems.append("e2e_record_interval_ms must be in 0..10000")
        if self.k < 1:
            problems.append("k must be at least 1")
        if any(not k or len(k) < 16 for k in self.api_keys):
            problems.append("api keys must be at least 16 characters")
        if problems:
            raise SettingsError("invalid settings: " + "; ".join(problems))

    @property
    def sealed(self) -> bool:
        """Whether the model's key comes from a key broker (attested boot)."""
        return self.broker_url is not None


def _protection_problems(profile: str, device: str, quant: str = "none") -> list[str]:
    """Checked by the protection package itself (imported only when the default is changed)."""
    from tdllm.profiles.registry import check_options

    try:
        check_options(profile, device, quant)
    except UsageError as exc:
        return [str(exc)]
    return []


def _quant_problems(s: Settings) -> list[str]:
    if s.quant not in QUANTS:
        return [f"quant must be one of {', '.join(QUANTS)}"]
    if s.quant == "none":
        return []
    if s.engine != "tdllm":
        return [f"quant {s.quant!r} is the tdllm engine's (vLLM quantizes with its own options)"]
    return _protection_problems(s.profile, s.device, s.quant)  # which profiles take it


def _compile_problems(s: Settings) -> list[str]:
    if s.compile not in COMPILE_MODES:
        return [f"compile must be one of {', '.join(COMPILE_MODES)}"]
    if s.compile == "off":
        return []
    if s.engine != "tdllm":
        return [f"compile {s.compile!r} is the tdllm engine's (vLLM compiles on its own)"]
    if s.profile not in ("td-only", "split"):
        return [
            f"compile {s.compile!r} runs where every block in the TD uses TD CPU kernels: "
            f"td-only or split, not {s.profile}"
        ]
    if s.compile == "decode-groups" and s.quant in NOT_GROUPED_QUANTS:
        return [
            f"compile 'decode-groups' shares one graph between the blocks, which quant "
            f"{s.quant!r} cannot (its packed weights are held by a handle): use compile 'decode'"
        ]
    return []


def _gpu_cc_problems(s: Settings) -> list[str]:
    problems = []
    if s.engine != "vllm":
        problems.append("profile 'gpu-cc' runs on engine 'vllm' (vLLM on the attested GPU)")
    if s.attestation == "none":
        problems.append(
            "profile 'gpu-cc' needs attestation 'tdx' or 'simulated' (its GPU "
            "evidence is bound into the quotes)"
        )
    if s.gpu_evidence not in GPU_EVIDENCE_SOURCES:
        problems.append(f"gpu_evidence must be one of {', '.join(GPU_EVIDENCE_SOURCES)}")
    elif s.gpu_evidence == "simulated" and s.attestation != "simulated":
        problems.append("gpu_evidence 'simulated' needs attestation 'simulated'")
    return problems


def _cluster_problems(s: Settings) -> list[str]:
    if s.cluster_address is None:
        return []
    problems = []
    try:
        ip_address(s.cluster_address)
    except ValueError:
        problems.append("cluster_address must be an IP address (the node's overlay address)")
    if not s.sealed:
        problems.append("cluster_address needs broker_url (the broker certifies the node)")
    if s.engine != "vllm":
        problems.append("cluster_address needs engine 'vllm' (the cluster is vLLM's, over Ray)")
    if not s.cluster_dir.startswith("/"):
        problems.append("cluster_dir must be an absolute path")
    return problems


def logprobs_limit(policy: str) -> int | None:
    """The most top logprobs `policy` allows, None when they are off; ValueError if malformed."""
    if policy == "off":
        return None
    kind, _, count = policy.partition(":")
    if kind != "top-k" or not count.isdigit() or not 0 <= int(count) <= 20:
        raise ValueError(policy)
    return int(count)


def _engine_problems(s: Settings) -> list[str]:
    try:
        logprobs_limit(s.logprobs_policy)
    except ValueError:
        return ['logprobs_policy must be "off" or "top-k:N" with N in 0..20']
    if s.engine not in ENGINES:
        return [f"engine must be one of {', '.join(ENGINES)}"]
    if s.engine == "tdllm":
        return ["vllm_args need engine 'vllm'"] if s.vllm_args else []
    from tdllm.vllm_engine.args import check_vllm_args

    problems = check_vllm_args(s.vllm_args)
    if s.profile not in ("td-only", GPU_CC):
        problems.append(
            f"profile {s.profile!r} runs only on the tdllm engine (it places layers on an "
            "untrusted device; vLLM runs the whole model inside the TD)"
        )
    if not s.vllm_python:
        problems.append(
            "engine 'vllm' needs vllm_python (the python of the vLLM virtual environment; "
            "`make vllm` makes .venv-vllm)"
        )
    if s.vllm_start_timeout_s <= 0:
        problems.append("vllm_start_timeout_s must be > 0")
    return problems


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_NOT_FROM_FILE = {"allow_simulated"}  # a file on disk must not be able to turn simulation on


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve the settings; `environ` defaults to ``os.environ`` (tests pass their own)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if path is not None:
        values |= _from_toml(path)
    values |= _from_environment(env)
    values |= dict(overrides or {})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(unknown)}")
    try:
        return Settings(**{k: _coerce(k, v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"invalid settings: {exc}") from None


def service_environment(settings_file: Path | None, **changes: str) -> dict[str, str]:
    """The environment for a child process (gunicorn) that resolves the same settings."""
    env = dict(os.environ)
    if settings_file is not None:
        env[CONFIG_ENV] = str(settings_file)
    env.update({ENV_PREFIX + k.upper(): v for k, v in changes.items()})
    return env


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from None
    table = document.get("service", document)
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [service] must be a table")
    forbidden = sorted(set(table) & _NOT_FROM_FILE)
    if forbidden:
        raise SettingsError(f"{path}: {', '.join(forbidden)} can only come from the environment")
    return dict(table)


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if name == "allow_simulated":
            values[name] = env.get(ALLOW_SIMULATED_ENV) == "1"
        elif key in env:
            values[name] = env[key]
    return values


def _coerce(name: str, value: Any) -> Any:
    """Environment values arrive as text; file values may be typed already."""
    kind = str(_FIELDS[name].type)
    if kind.startswith("tuple"):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if value is None or not isinstance(value, str):
        if kind == "int" and isinstance(value, bool):
            raise ValueError(f"{name} must be an integer")
        return value
    if kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, not {value!r}") from None
    if kind == "float":
        return float(value)
    if kind == "bool":
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{name} must be a boolean")
        return value.lower() in ("1", "true", "yes")
    if kind.startswith("str | None"):
        return value or None
    return value
