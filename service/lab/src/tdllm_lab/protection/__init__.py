"""Protection profiles (`td-only`, `split`), `tdllm prepare`, and `tdllm bench split`."""
