"""The attack suite: what an adversary holding the untrusted device learns, measured.

Each attack is one module exposing ``run(options: AttackOptions) -> AttackResult``; it drives a
protection profile on a device, then attacks only what that device held or saw (its transcript
and resident tensors) plus what the threat model grants the adversary (the public base model).
The private model is used only as ground truth to score the attack. `registry.ATTACKS` lists
them; `tdllm attack NAME --profile P` runs one.
"""
