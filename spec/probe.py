"""Observe attention weights without touching the module's code.

A ``TorchFunctionMode`` records the calls a module makes to softmax (``torch.softmax``,
``F.softmax``, ``Tensor.softmax``), dropout (``F.dropout``, ``nn.Dropout``) and matmul (``@``,
``torch.matmul``, ``bmm``, ``einsum``). A softmax over a (num_tokens, num_tokens) score matrix is an
attention softmax; the operand of the next matmul that was computed from its output is the weights
actually applied (after any renormalization or dropout). A fused ``scaled_dot_product_attention`` hides
its weights: then nothing is observed and weight-level invariants are not applicable.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
DROPOUT = {F.dropout, torch.dropout}
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum}


@dataclass
class Head:
    """One attention softmax call and what the module did with its output."""

    scores: torch.Tensor  # the softmax input, (..., T, T)
    weights: torch.Tensor  # the softmax output
    applied: torch.Tensor = None  # the weights operand of the following weights @ values, if seen
    dropped: torch.Tensor = None  # the output of a train-mode dropout applied to these weights, if seen


@dataclass
class Observation:
    heads: list = field(default_factory=list)

    def applied_weights(self):
        """The weights multiplied into the values, per softmax call: the matmul operand if seen, else the
        dropout output if seen, else the softmax output."""
        applied = [next(w for w in (h.applied, h.dropped, h.weights) if w is not None) for h in self.heads]
        return [a.reshape(h.weights.shape) if a.numel() == h.weights.numel() else a  # bmm on (B*H, T, T)
                for a, h in zip(applied, self.heads)]


class AttentionProbe(TorchFunctionMode):
    def __init__(self, num_tokens):
        super().__init__()
        self.num_tokens = num_tokens
        self.observation = Observation()
        self._open = None  # the head whose weights are waiting for their matmul
        self._derived = {}  # id -> tensor: the open softmax output and everything computed from it

    def _is_square(self, t):
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (self.num_tokens, self.num_tokens)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        derived = [t for t in inputs if id(t) in self._derived and self._derived[id(t)] is t]
        if func in SOFTMAX and self._is_square(out):
            self._open = Head(scores=args[0].detach().clone(), weights=out.detach().clone())
            self.observation.heads.append(self._open)
            self._derived = {id(out): out}
        elif self._open is None or not derived:
            pass
        elif func in MATMUL:  # weights (or something computed from them) @ values: the applied weights
            self._open.applied = derived[0].detach().clone()
            self._open, self._derived = None, {}
        else:
            if func in DROPOUT and self._is_square(out):
                self._open.dropped = out.detach().clone()
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._derived[id(t)] = t
        return out
