"""UNSAFE, test and development only: the simulated TDX platform and everything built on it.

- `platform`: `SimulatedTdxPlatform`, an in-memory test PKI that signs synthetic v4 quotes
  (`SyntheticTdFields`) and collateral (template: `simulated_template.json`);
- `provider`: `SimulatedProvider`, a guest `QuoteProvider` over such a platform;
- `qgs`: the simulated quote-generation service (host side) and its guest provider.

Nothing here is evidence of anything. Production modules never import this package (an
import-linter contract in the repository's pyproject.toml); a simulated root reaches the verifier
only as DER bytes through `tdllm_attest.trust.select_trust_anchor` (mode "simulated" AND
TDLLM_ALLOW_SIMULATED_TDX=1).
"""
