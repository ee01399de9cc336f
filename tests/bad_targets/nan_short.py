"""NaN in the output whenever the sequence is shorter than context_length."""

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def forward(self, x):
        out = super().forward(x)
        if x.shape[1] < self.context_length:
            out = out * float("nan")
        return out
