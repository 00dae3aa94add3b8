"""The key broker (`tdllm-kb/1`): releases data keys to attested TDs, and its in-TD client.

Protocol: docs/attestation.md, "Key release protocol". Needs the `[broker]` extra (flask, jwcrypto).
"""
