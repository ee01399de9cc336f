"""Helpers for adapters: parameter views, the causal mask, and sub-layers spanning several modules."""

import torch


def rows(tensor, i, n):
    """Rows i*len/n:(i+1)*len/n of a parameter as a view sharing its storage (writes go through)."""
    if tensor is None:
        return None
    size = tensor.shape[0] // n
    return tensor.detach()[i * size:(i + 1) * size]


def causal_mask(context_length):
    """(context_length, context_length) bool, True above the diagonal: the future, not attended."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


class SubLayer:
    """A block's sub-layer as the span from ``first``'s input to ``last``'s output (``last`` defaults
    to ``first``), for an adapter's ``sublayers()`` when no submodule maps LN(h) to exactly the tensor
    added to the residual stream: an attention returning ``(output, weights)``, or a feed-forward
    written inline in the block's forward (``linear2(act(linear1(h)))``).

    It offers what the block invariants use of a submodule, ``register_forward_hook(hook[, with_kwargs])``: ``hook(self,
    (input,)[, {}], output)`` runs after ``last`` with ``first``'s first input and ``last``'s output (the first
    element of a tuple); a returned tensor replaces that output, as with nn.Module hooks."""

    def __init__(self, first, last=None):
        self.first, self.last = first, first if last is None else last

    def register_forward_hook(self, hook, with_kwargs=False):
        seen = {}

        def pre(module, args, kwargs):
            seen["input"] = args[0] if args else next(iter(kwargs.values()))

        def post(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            args = (self, (seen.pop("input"),), {}, first) if with_kwargs else (self, (seen.pop("input"),), first)
            replaced = hook(*args)
            if replaced is None:
                return None
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return _Handles(self.first.register_forward_pre_hook(pre, with_kwargs=True),
                        self.last.register_forward_hook(post))


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()
