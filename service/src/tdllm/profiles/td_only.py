"""`td-only`: every block, the embedding and the lm_head on the TD CPU; nothing leaves the TD."""

from __future__ import annotations

from tdllm.profiles.base import ProfileBase


class TdOnly(ProfileBase):
    name = "td-only"
