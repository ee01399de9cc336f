"""The constructor raises TypeError only for qkv_bias=True: it can be called with the kind's arguments,
so this is the module's violation (exit 1), not a usage error."""

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        if qkv_bias:
            raise TypeError("qkv_bias is not supported yet")
        super().__init__(d_in, d_out, context_length, dropout, num_heads)
