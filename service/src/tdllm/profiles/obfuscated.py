"""`obfuscated` (seed 000): every projection on the device with decoys, restored in the TD.

q|k|v is padded per head with decoy RoPE pairs and v ShadowNet-obfuscated; the layer's
attention core (`ObfuscatedAttention`) gets the padded scores and v back, subtracts the decoy
scores and runs softmax and softmax·V in the TD. o, gate|up, down and the lm_head are
ShadowNet-obfuscated. The embedding, the norms, the decoy weights and every secret stay in the
TD (`Obfuscation`). What this does not hide is in docs/security.md (§ obfuscated): the attack
suite (A2, A4, A6) recovers the weights.
"""

from __future__ import annotations

from tdllm.model.config import ModelConfig
from tdllm.model.linear import LinearMethodTable
from tdllm.model.transformer import AttentionCore
from tdllm.profiles.base import ProfileBase
from tdllm.trusted.obfuscated_methods import Obfuscation, PaddedQKVMethod, ShadowMethod


class Obfuscated(ProfileBase):
    name = "obfuscated"
    uses_device = True
    obfuscation: Obfuscation | None = None  # the TD's secrets (attack scoring reads them)

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        o = self.options
        ob = Obfuscation(
            self.crossing,
            cfg,
            o.obfuscation_eta,
            o.obfuscation_seed,
            self.max_batch,
            self.max_seq_len,
        )
        self.obfuscation = ob
        return LinearMethodTable([("*.qkv_proj", PaddedQKVMethod(ob))], ShadowMethod(ob))

    def attention_core(self, layer: int) -> AttentionCore | None:
        return None if self.obfuscation is None else self.obfuscation.cores[layer]
