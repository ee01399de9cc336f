"""Observe attention weights without touching the module's code.

A ``TorchFunctionMode`` records the calls a module makes to softmax (``torch.softmax``,
``F.softmax``, ``Tensor.softmax``), dropout (``F.dropout``, ``nn.Dropout``) and matmul (``@``,
``torch.matmul``, ``bmm``). A softmax over a (num_tokens, num_tokens) score matrix is an
attention softmax; the left operand of the next (…, T, T) @ V matmul is the weights actually
applied (after any renormalization or dropout). A fused ``scaled_dot_product_attention`` hides
its weights: then nothing is observed and weight-level invariants are not applicable.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
DROPOUT = {F.dropout, torch.dropout}
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}


@dataclass
class Head:
    """One attention softmax call and what the module did with its output."""

    scores: torch.Tensor  # the softmax input, (..., T, T)
    weights: torch.Tensor  # the softmax output
    applied: torch.Tensor = None  # left operand of the following weights @ values, if seen
    dropout_p: float = None  # p of a dropout applied to these weights, if seen


@dataclass
class Observation:
    heads: list = field(default_factory=list)

    def applied_weights(self):
        """The weights multiplied into the values, per softmax call (the softmax output if no matmul seen)."""
        return [h.applied if h.applied is not None else h.weights for h in self.heads]


class AttentionProbe(TorchFunctionMode):
    def __init__(self, num_tokens):
        super().__init__()
        self.num_tokens = num_tokens
        self.observation = Observation()
        self._open = None  # the head whose weights are waiting for their matmul

    def _is_square(self, t):
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (self.num_tokens, self.num_tokens)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SOFTMAX and self._is_square(out):
            self._open = Head(scores=args[0].detach().clone(), weights=out.detach().clone())
            self.observation.heads.append(self._open)
        elif func in DROPOUT and self._open is not None and self._is_square(out):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training:
                self._open.dropout_p = float(p)
        elif func in MATMUL and self._open is not None and self._is_square(args[0]):
            self._open.applied = args[0].detach().clone()
            self._open = None
        return out
