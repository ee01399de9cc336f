"""forward returns (context, attention weights) instead of the context tensor."""

import torch

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def forward(self, x):
        out = super().forward(x)
        weights = torch.ones(x.shape[0], self.num_heads, x.shape[1], x.shape[1])
        return out, weights
