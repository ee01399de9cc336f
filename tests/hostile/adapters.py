"""Hostile adapters: an adapter's attributes and hooks are the target's code, so their faults are the target's."""

import attnspec
from attnspec.impl import MultiHeadAttention


class _Built(attnspec.Adapter):
    kind = "mha"

    def build(self, cfg):
        return MultiHeadAttention(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads, cfg.qkv_bias)


class AdjustRaises(_Built):
    def adjust(self, cfg):
        raise RuntimeError("adjust broke")


class KindRaises(_Built):
    @property
    def kind(self):
        raise RuntimeError("no kind for you")
