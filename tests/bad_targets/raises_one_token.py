"""forward raises ValueError for some configurations only: a single token."""

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def forward(self, x):
        if x.shape[1] == 1:
            raise ValueError("need at least two tokens")
        return super().forward(x)
