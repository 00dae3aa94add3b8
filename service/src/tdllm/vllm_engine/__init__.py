"""The `vllm` engine: vLLM's OpenAI server as a child of the service, inside the TD.

The Flask service stays the only public face (auth, validation, attestation, E2E, receipts,
metrics); vLLM listens on a Unix socket in a private memory-backed directory, never on a port
the host can reach. `args` is the allow-list of vLLM options a deployment may set,
`model_dir` writes the config and tokenizer vLLM reads (never a weight), `child` starts and
supervises the process (the data key over an inherited pipe, the process tied to the
service's life), `socket_http` speaks HTTP over the socket, and `backend` is what the API sees
in place of the tdllm engine's runner. The vLLM side of it all is the `tdllm-vllm`
distribution (service/vllm: the sealed-model loader plugin and the launcher).
"""
