"""OpenAI-compatible endpoints, split the way vLLM splits its server: `protocol` parses and
validates request bodies (against `request_fields`' tables), `errors` is the one mapping from
failures to OpenAI error bodies, `sse` frames streams, and `models`/`completions`/`chat` are thin
blueprints over `generation`."""
