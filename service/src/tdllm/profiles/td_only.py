"""`td-only`: every block, the embedding and the lm_head on the TD CPU; nothing leaves the TD.

With ``quant`` (int8, int4, w8a8) every projection, the lm_head included, keeps its weights
quantized (`tdllm.model.quantized.quant_table`: int4 keeps the lm_head int8, W8A8 where the CPU
has VNNI; w8a8 keeps q|k|v weight-only); a tied lm_head gets a quantized copy of the
embedding, which stays in the model's dtype, or, from a GGUF that stores it quantized, as its
blocks (`BlockEmbedding`).
"""

from __future__ import annotations

from tdllm.model.config import ModelConfig
from tdllm.model.linear import LinearMethodTable
from tdllm.model.quantized import quant_table
from tdllm.profiles.base import ProfileBase


class TdOnly(ProfileBase):
    name = "td-only"

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        return quant_table(self.options.quant)
