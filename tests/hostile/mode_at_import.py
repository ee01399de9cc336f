"""A NaN-returning module whose file, when imported, enters a torch function mode that says every tensor is finite
(red-team pass 7 on issue 12): what an import changes process-wide must not become the baseline the worker's own
comparisons run under. (Its own file: importing it into pytest's process would leave the mode there.)"""

import torch

from attnspec.impl import MultiHeadAttention


class _HidesNaN(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        return torch.ones_like(result) if getattr(func, "__name__", "") == "isfinite" else result


class MHA(MultiHeadAttention):
    def forward(self, x):
        return super().forward(x) * float("nan")


_HidesNaN().__enter__()
