"""`tdllm bench`: side-by-side measurements, each configuration in its own process."""
