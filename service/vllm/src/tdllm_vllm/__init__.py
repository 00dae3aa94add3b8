"""tdllm inside vLLM's own processes (the vLLM virtual environment, never the service's).

`plugin` registers the model loaders (`--load-format tdllm-sealed` and `tdllm`), `loader` reads
our checkpoints into vLLM's model (the data key arrives over the service's one-shot loader
channel: `tdllm.vllm_engine.loader_channel`), and `launch` is what the service runs: vLLM's
OpenAI server tied to the service's life. The service side is `tdllm.vllm_engine`.
"""
