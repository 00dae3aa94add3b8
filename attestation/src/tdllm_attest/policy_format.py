"""The signed reference-values / TCB policy: its format (parse, serialize, sign, verify).

The policy is a JSON document (schema `tdllm-attest-policy/1`, checked by hand here) wrapped in an
Ed25519-signed envelope. `policy_from_document` schema-checks the inner document, `sign_policy`
wraps it, `load_policy` verifies an envelope and parses it. Judging a verified quote against a
parsed `Policy` is `tdllm_attest.policy`. See docs/attestation.md for the format with a full
example.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import timedelta
from ipaddress import ip_network
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tdllm_attest.abi import (
    MR_CONFIG_ID_SIZE,
    MR_OWNER_CONFIG_SIZE,
    MR_OWNER_SIZE,
    MR_SEAM_SIZE,
    MR_TD_SIZE,
    RTMR_SIZE,
    XFAM_SIZE,
)
from tdllm_attest.cluster.policy import ClusterPolicy
from tdllm_attest.collateral import DEFAULT_MAX_COLLATERAL_AGE, FreshnessLimits
from tdllm_attest.ed25519_pem import public_key_from_pem
from tdllm_attest.errors import PolicyDocumentError
from tdllm_attest.gpu.policy import GpuPolicy
from tdllm_attest.model_identity import valid_model_name
from tdllm_attest.verify import TCB_STATUSES
from tdllm_attest.wire import canonical_json

POLICY_SCHEMA = "tdllm-attest-policy/1"
SIGNATURE_ALG = "Ed25519"
STATUS_UP_TO_DATE = "UpToDate"
RTMR3_ZERO = "zero"
RTMR3_EVENT_LOG = "event_log"
_TOP_KEYS = {
    "schema",
    "name",
    "tcb",
    "xfam",
    "mr_seam",
    "measurements",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "rtmr3",
    "rtmr3_allowed_events",
    "allow_service_td",
    "models",
    "gpu",
    "cluster",
}
_TCB_KEYS = {
    "accepted_statuses",
    "allowed_advisories",
    "min_tcb_evaluation_data_number",
    "max_collateral_age_days",
    "max_collateral_age_hours",
    "out_of_date_grace_days",
}
_TUPLE_KEYS = {"name", "mr_td", "rtmr0", "rtmr1", "rtmr2"}
_MODEL_KEYS = {"model", "min_version"}
_GPU_KEYS = {"driver_versions", "vbios_versions"}
_CLUSTER_KEYS = {"networks", "certificate_lifetime_s", "wireguard"}


@dataclass(frozen=True)
class TcbPolicy:
    """Which TCB statuses and advisories are acceptable. Revoked is refused even if listed.

    `out_of_date_grace`: after a TCB recovery, a platform is OutOfDate until its operator updates
    it; the owner may keep serving meanwhile. An OutOfDate(ConfigurationNeeded) status is then
    accepted while the matched TCB level's `tcbDate` (the last date it was known not vulnerable)
    is within the grace; the advisories that made it out of date are tolerated only then.
    """

    accepted_statuses: frozenset[str] = frozenset({STATUS_UP_TO_DATE})
    allowed_advisories: frozenset[str] = frozenset()
    min_tcb_evaluation_data_number: int | None = None
    max_collateral_age: timedelta | None = DEFAULT_MAX_COLLATERAL_AGE
    out_of_date_grace: timedelta | None = None


@dataclass(frozen=True)
class MeasurementTuple:
    """One allowed (MRTD, RTMR0, RTMR1, RTMR2) combination, e.g. one release of the image."""

    name: str
    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes


@dataclass(frozen=True)
class ModelRule:
    """A model whose keys may be released, from `min_version` on (older ones are rollbacks)."""

    model: str
    min_version: int


@dataclass(frozen=True)
class Policy:
    """Reference values and TCB rules a genuine quote must also satisfy."""

    name: str
    tcb: TcbPolicy
    xfam: frozenset[bytes]
    measurements: tuple[MeasurementTuple, ...]
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr3: str | bytes  # "zero", "event_log", or an exact 48-byte value
    mr_seam: frozenset[bytes] = field(default_factory=frozenset)
    rtmr3_allowed_events: frozenset[bytes] | None = None
    allow_service_td: bool = False
    # which models (and from which version) a key under this policy may unlock; None: any
    models: tuple[ModelRule, ...] | None = None
    # the gpu-cc profile: GPU evidence is required and judged by these rules; None: no GPU
    gpu: GpuPolicy | None = None
    # cluster nodes: the broker certifies attested TDs' cluster keys by these rules; None: never
    cluster: ClusterPolicy | None = None

    def freshness_limits(self) -> FreshnessLimits:
        """Collateral limits that `verify_quote` must apply for this policy."""
        return FreshnessLimits(
            max_age=self.tcb.max_collateral_age,
            min_tcb_evaluation_data_number=self.tcb.min_tcb_evaluation_data_number,
        )


def _hex(value: object, size: int, where: str) -> bytes:
    if not isinstance(value, str):
        raise PolicyDocumentError(f"policy {where}: want a hex string of {size} bytes")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise PolicyDocumentError(f"policy {where}: {value!r} is not hex") from None
    if len(raw) != size:
        raise PolicyDocumentError(f"policy {where}: {len(raw)} bytes, want {size}")
    return raw


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyDocumentError(f"policy {where}: want a list")
    return value


def _keys(obj: object, allowed: set[str], required: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise PolicyDocumentError(f"policy {where}: want an object")
    unknown = set(obj) - allowed
    missing = required - set(obj)
    if unknown:
        raise PolicyDocumentError(f"policy {where}: unknown key(s) {sorted(unknown)}")
    if missing:
        raise PolicyDocumentError(f"policy {where}: missing key(s) {sorted(missing)}")
    return obj


def _optional_int(value: object, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyDocumentError(f"policy {where}: want a non-negative integer")
    return value


def _tcb_policy(obj: object) -> TcbPolicy:
    tcb = _keys(obj, _TCB_KEYS, {"accepted_statuses"}, "tcb")
    statuses = _list(tcb["accepted_statuses"], "tcb.accepted_statuses")
    for status in statuses:
        if status not in TCB_STATUSES:
            raise PolicyDocumentError(f"policy tcb.accepted_statuses: unknown status {status!r}")
    advisories = _list(tcb.get("allowed_advisories", []), "tcb.allowed_advisories")
    if not all(isinstance(a, str) for a in advisories):
        raise PolicyDocumentError("policy tcb.allowed_advisories: want strings")
    if "max_collateral_age_days" in tcb and "max_collateral_age_hours" in tcb:
        raise PolicyDocumentError("policy tcb: give max_collateral_age_hours or _days, not both")
    days = _optional_int(tcb.get("max_collateral_age_days"), "tcb.max_collateral_age_days")
    hours = _optional_int(tcb.get("max_collateral_age_hours"), "tcb.max_collateral_age_hours")
    grace = _optional_int(tcb.get("out_of_date_grace_days"), "tcb.out_of_date_grace_days")
    if days is not None:
        max_age = timedelta(days=days)
    elif hours is not None:
        max_age = timedelta(hours=hours)
    else:  # absent: the default, never "no limit" (fail closed)
        max_age = DEFAULT_MAX_COLLATERAL_AGE
    return TcbPolicy(
        accepted_statuses=frozenset(statuses),
        allowed_advisories=frozenset(advisories),
        min_tcb_evaluation_data_number=_optional_int(
            tcb.get("min_tcb_evaluation_data_number"), "tcb.min_tcb_evaluation_data_number"
        ),
        max_collateral_age=max_age,
        out_of_date_grace=None if grace is None else timedelta(days=grace),
    )


def _model_rules(value: object) -> tuple[ModelRule, ...] | None:
    if value is None:
        return None
    rules = []
    for i, item in enumerate(_list(value, "models")):
        rule = _keys(item, _MODEL_KEYS, _MODEL_KEYS, f"models[{i}]")
        if not valid_model_name(rule["model"]):
            raise PolicyDocumentError(f"policy models[{i}].model: want 1..200 printable characters")
        minimum = _optional_int(rule["min_version"], f"models[{i}].min_version")
        if minimum is None:
            raise PolicyDocumentError(f"policy models[{i}].min_version: want an integer")
        rules.append(ModelRule(rule["model"], minimum))
    names = [r.model for r in rules]
    if len(set(names)) != len(names):
        raise PolicyDocumentError("policy models: a model is listed twice")
    return tuple(rules)


def _gpu_policy(value: object) -> GpuPolicy | None:
    """`{"driver_versions": [...], "vbios_versions": [...]}`; an empty list: any version the
    verifier's RIMs (NVIDIA's signed reference values) cover."""
    if value is None:
        return None
    gpu = _keys(value, _GPU_KEYS, _GPU_KEYS, "gpu")
    versions = {}
    for name in sorted(_GPU_KEYS):
        items = _list(gpu[name], f"gpu.{name}")
        if not all(isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable() for v in items):
            raise PolicyDocumentError(f"policy gpu.{name}: want version strings")
        versions[name] = frozenset(v.lower() for v in items)
    return GpuPolicy(
        allowed_driver_versions=versions["driver_versions"],
        allowed_vbios_versions=versions["vbios_versions"],
    )


def _cluster_policy(value: object) -> ClusterPolicy | None:
    """`{"networks": [CIDR, ...], "certificate_lifetime_s": int, "wireguard": bool}`: the key's
    broker certifies attested cluster nodes with addresses in `networks` (docs/attestation.md)."""
    if value is None:
        return None
    cluster = _keys(value, _CLUSTER_KEYS, {"networks"}, "cluster")
    networks = []
    for i, item in enumerate(_list(cluster["networks"], "cluster.networks")):
        try:
            networks.append(ip_network(str(item), strict=True))
        except ValueError:
            raise PolicyDocumentError(f"policy cluster.networks[{i}]: not a CIDR") from None
    lifetime = cluster.get("certificate_lifetime_s", 86400)
    wireguard = cluster.get("wireguard", True)
    if type(lifetime) is not int or not isinstance(wireguard, bool):
        raise PolicyDocumentError("policy cluster: want integer seconds and a boolean")
    try:
        return ClusterPolicy(tuple(networks), timedelta(seconds=lifetime), wireguard)
    except ValueError as exc:
        raise PolicyDocumentError(f"policy cluster: {exc}") from None


def policy_from_document(doc: object) -> Policy:
    """Schema-check a policy document (the inner, unsigned object) and build a `Policy`."""
    required = {"schema", "tcb", "xfam", "measurements", "mr_config_id", "mr_owner"}
    required |= {"mr_owner_config", "rtmr3"}
    top = _keys(doc, _TOP_KEYS, required, "document")
    if top["schema"] != POLICY_SCHEMA:
        raise PolicyDocumentError(f"policy schema {top['schema']!r} is not {POLICY_SCHEMA!r}")
    tuples = []
    for i, item in enumerate(_list(top["measurements"], "measurements")):
        t = _keys(item, _TUPLE_KEYS, _TUPLE_KEYS - {"name"}, f"measurements[{i}]")
        tuples.append(
            MeasurementTuple(
                name=str(t.get("name", f"#{i}")),
                mr_td=_hex(t["mr_td"], MR_TD_SIZE, f"measurements[{i}].mr_td"),
                rtmr0=_hex(t["rtmr0"], RTMR_SIZE, f"measurements[{i}].rtmr0"),
                rtmr1=_hex(t["rtmr1"], RTMR_SIZE, f"measurements[{i}].rtmr1"),
                rtmr2=_hex(t["rtmr2"], RTMR_SIZE, f"measurements[{i}].rtmr2"),
            )
        )
    if not tuples:
        raise PolicyDocumentError("policy measurements: at least one allowed tuple is required")
    rtmr3_raw = top["rtmr3"]
    rtmr3: str | bytes
    if rtmr3_raw in (RTMR3_ZERO, RTMR3_EVENT_LOG):
        rtmr3 = str(rtmr3_raw)
    else:
        rtmr3 = _hex(rtmr3_raw, RTMR_SIZE, "rtmr3 (want 'zero', 'event_log' or 48 bytes hex)")
    allowed_events = top.get("rtmr3_allowed_events")
    allow_service_td = top.get("allow_service_td", False)
    if not isinstance(allow_service_td, bool):
        raise PolicyDocumentError("policy allow_service_td: want true or false")
    return Policy(
        name=str(top.get("name", "")),
        tcb=_tcb_policy(top["tcb"]),
        xfam=frozenset(
            _hex(x, XFAM_SIZE, f"xfam[{i}]") for i, x in enumerate(_list(top["xfam"], "xfam"))
        ),
        measurements=tuple(tuples),
        mr_config_id=_hex(top["mr_config_id"], MR_CONFIG_ID_SIZE, "mr_config_id"),
        mr_owner=_hex(top["mr_owner"], MR_OWNER_SIZE, "mr_owner"),
        mr_owner_config=_hex(top["mr_owner_config"], MR_OWNER_CONFIG_SIZE, "mr_owner_config"),
        rtmr3=rtmr3,
        mr_seam=frozenset(
            _hex(x, MR_SEAM_SIZE, f"mr_seam[{i}]")
            for i, x in enumerate(_list(top.get("mr_seam", []), "mr_seam"))
        ),
        rtmr3_allowed_events=None
        if allowed_events is None
        else frozenset(
            _hex(x, RTMR_SIZE, f"rtmr3_allowed_events[{i}]")
            for i, x in enumerate(_list(allowed_events, "rtmr3_allowed_events"))
        ),
        allow_service_td=allow_service_td,
        models=_model_rules(top.get("models")),
        gpu=_gpu_policy(top.get("gpu")),
        cluster=_cluster_policy(top.get("cluster")),
    )


def sign_policy(document: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """Wrap a policy document in a signed envelope (JSON text) after checking its schema."""
    policy_from_document(document)
    signature = key.sign(canonical_json(document))
    envelope = {
        "policy": document,
        "signature": {"alg": SIGNATURE_ALG, "value": base64.b64encode(signature).decode()},
    }
    return json.dumps(envelope, indent=2, sort_keys=True) + "\n"


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Load the policy signer's Ed25519 public key (PEM SubjectPublicKeyInfo)."""
    try:
        return public_key_from_pem(pem, "policy key")
    except ValueError as exc:
        raise PolicyDocumentError(str(exc)) from None


def load_policy(text: str, key: Ed25519PublicKey) -> Policy:
    """Verify a signed policy envelope with `key`, then schema-check the document inside."""
    try:
        envelope = json.loads(text)
    except ValueError:
        raise PolicyDocumentError("policy file is not JSON") from None
    env = _keys(envelope, {"policy", "signature"}, {"policy", "signature"}, "envelope")
    sig = _keys(env["signature"], {"alg", "value"}, {"alg", "value"}, "signature")
    if sig["alg"] != SIGNATURE_ALG or not isinstance(sig["value"], str):
        raise PolicyDocumentError(f"policy signature algorithm must be {SIGNATURE_ALG}")
    try:
        signature = base64.b64decode(sig["value"], validate=True)
        key.verify(signature, canonical_json(env["policy"]))
    except (binascii.Error, ValueError, InvalidSignature):
        raise PolicyDocumentError("policy signature does not verify with the given key") from None
    return policy_from_document(env["policy"])
