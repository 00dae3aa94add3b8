"""Sealed models: weights encrypted at rest, decrypted only in TD memory.

`writer.seal_checkpoint` turns any checkpoint into a sealed directory; `reader.open_sealed` opens
one with a recipient private key or the raw data key and returns an ordinary `Checkpoint` whose
tensors are decrypted chunk by chunk as the loader streams them. Every failure to open is one
opaque `errors.SealedModelError`. `format` defines the bytes (docs/sealed-format.md), `recipients`
the JWE key wrapping and key pairs, `keys` the wiping of key material, `commands` the CLI.

The reader builds on `tdllm.model.checkpoint` (the `Checkpoint` type) and never the other way;
`tdllm.sources.open_checkpoint` is what dispatches a sealed directory to it.
"""
