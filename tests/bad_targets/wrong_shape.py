"""The output projection maps to d_in instead of d_out: the output is d_in wide."""

import torch.nn as nn

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.out_proj = nn.Linear(d_out, d_in)
