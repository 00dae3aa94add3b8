"""tdllm: a confidential LLM appliance for Intel TDX (the in-TD service)."""

__version__ = "0.1.0"
