"""An adapter that declares no kind: it needs KIND= on the command line."""

from attnspec import Adapter
from attnspec.impl import MultiHeadAttention


class NoKind(Adapter):
    def build(self, cfg):
        return MultiHeadAttention(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads, cfg.qkv_bias)


class UnknownVariant(NoKind):
    kind = "mha"
    variants = ("no-such-variant",)


class UnknownKind(NoKind):
    kind = "attention"
