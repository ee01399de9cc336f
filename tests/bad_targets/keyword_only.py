"""A keyword-only constructor: the kind passes (d_in, d_out, context_length, dropout, num_heads)
positionally, so the arguments do not bind (a usage error: check it through an adapter)."""

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def __init__(self, *, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias=qkv_bias)
