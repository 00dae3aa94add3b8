"""Node certificates for a multi-TD vLLM cluster, issued by the key broker after attestation.

`identity` (in the TD: keys and the CSR), `request` (parse and check a CSR), `ca` (the model
owner's cluster CA: issue), `peers` (admit peers whose certificates chain to that CA),
`policy` (the key policy's `cluster` section). Protocol: docs/attestation.md, "Node
certificates for a cluster".
"""
