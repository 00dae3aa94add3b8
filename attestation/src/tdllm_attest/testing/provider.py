"""UNSAFE simulated guest quote provider: quotes from an in-process `SimulatedTdxPlatform`.

The production provider is `tdllm_attest.quote.ConfigfsTsmProvider`; nothing falls back from it to
this one. Only tests, the attestation bench and the dev appliance build a `SimulatedProvider`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from tdllm_attest.quote import _check_report_data
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields

log = logging.getLogger(__name__)


@dataclass
class SimulatedProvider:
    """UNSAFE: quotes from a `SimulatedTdxPlatform`; `fields` sets everything but REPORTDATA."""

    platform: SimulatedTdxPlatform
    fields: SyntheticTdFields = field(default_factory=SyntheticTdFields)

    def get_quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        log.warning("UNSAFE: producing a SIMULATED TDX quote (no hardware, no protection)")
        return self.platform.quote(dataclasses.replace(self.fields, report_data=report_data))
