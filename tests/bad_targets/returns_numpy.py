"""forward returns a NumPy array instead of a torch.Tensor."""

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def forward(self, x):
        return super().forward(x).detach().cpu().numpy()
