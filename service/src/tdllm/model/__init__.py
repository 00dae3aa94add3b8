"""The Llama-family model, its checkpoint loaders and its tokenizer.

`transformer.py` is the network; it asks `linear.py` for every projection, so where and how a
matmul runs (TD CPU, untrusted device, behind masks) is a per-layer strategy, not model code.
"""
