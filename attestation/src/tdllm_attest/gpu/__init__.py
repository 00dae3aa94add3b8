"""NVIDIA confidential-computing GPU evidence for the gpu-cc profile (Hopper only).

The same split as the TDX verifier: `abi` parses the SPDM GET_MEASUREMENTS transcript, `verify`
checks the device certificate chain up to the pinned NVIDIA root and the report signature, `rim`
parses and verifies NVIDIA's signed reference values (RIMs), `policy` judges a verified report
against them. `evidence` is the wire form, `anchors` the pinned roots and the simulated gate.

What this package does NOT do: check revocation (NVIDIA's own verifier asks its OCSP service and
fetches RIMs online; we never touch the network, so a revoked device or RIM certificate is still
accepted until it expires), attest Blackwell, or attest NVSwitches / protected PCIe (PPCIE).
"""
