"""Observe attention weights without touching the module's code.

A ``TorchFunctionMode`` records the calls a module makes to softmax (``torch.softmax``,
``F.softmax``, ``Tensor.softmax``), dropout (``F.dropout``, ``nn.Dropout``) and matmul (``@``,
``torch.matmul``, ``bmm``, ``einsum``). A softmax over an axis of num_tokens keys, of a tensor with
another axis of num_tokens queries, is an attention softmax; the operand of the next matmul that was
computed from its output is the weights actually applied (after any renormalization or dropout).

Layouts. Every recorded tensor is returned in the (..., query, key) layout, the other axes in their
order. The key axis of the softmax output is the softmax's ``dim``; the axes of the applied operand
come from how it is contracted with the values: ``W @ V`` contracts W's last axis (W is (query, key)),
``X @ W`` its second to last (W is (key, query), e.g. ``V^T @ softmax(K Q^T, dim=-2)``); in an einsum the
key is the contracted index and the query the index of the output the values lack (so heads and
tokens of the same size are not confused). The softmax output takes the applied operand's query axis
when the two have the same shape and key axis, else the other of its last two axes.

Fused kernels. ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
enable_gqa)`` determines its weights exactly: softmax(q k^T * scale + mask), with the causal mask
top-left aligned, a bool mask True where attended, a float mask added, and k/v heads repeated for GQA.
The probe computes them from the recorded arguments. With ``dropout_p == 0`` the module gets the real
kernel's output; with ``dropout_p > 0`` (which the kernel applies in any mode) the probe runs the same
computation unfused — softmax, ``F.dropout(p)``, ``@ v`` — so the dropout applied is observable.
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) is called with ``need_weights=True,
average_attn_weights=False``, which returns the weights it applied (after dropout), once more in eval for
those before dropout; its scores are not exposed, so they are recorded as log(weights), which
the softmax maps back to the same weights.

A TorchFunctionMode does not see the calls made inside a call it intercepts: nothing inside the
fused calls above is recorded twice. An exception of the probe's own code is an ``InternalError``
(kept in ``error`` too, in case the module catches it), never the module's fault.
"""

import inspect
import math
import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from attnspec.errors import internal_error

SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
DROPOUT = {F.dropout, torch.dropout}
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
EINSUM = {torch.einsum}
SDPA = F.scaled_dot_product_attention
MHA_FORWARD = F.multi_head_attention_forward
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _to_qk(t, axes):
    """``t`` with its (query, key) axes moved last, the others in order."""
    return None if t is None else t.movedim(axes, (-2, -1))


@dataclass
class Head:
    """One attention softmax (or fused call) and what the module did with its output. Raw tensors are
    in the module's layout; the properties give (..., query, key)."""

    raw_scores: torch.Tensor  # the softmax input
    raw_weights: torch.Tensor  # the softmax output
    axes: tuple  # (query axis, key axis) of raw_scores/raw_weights
    raw_applied: torch.Tensor = None  # the weights operand of the following weights @ values, if seen
    applied_axes: tuple = None
    raw_dropped: torch.Tensor = None  # the output of a train-mode dropout applied to these weights, if seen
    source: str = "softmax"  # or the fused call the weights were computed from
    dropout_p: float = None  # the dropout a fused call was asked for
    rows_axis: int = None  # set when the weights are applied with rows along another axis than ``axes`` says

    @property
    def scores(self):
        return _to_qk(self.raw_scores, self.axes)

    @property
    def weights(self):
        return _to_qk(self.raw_weights, self.axes)

    @property
    def applied(self):
        return _to_qk(self.raw_applied, self.applied_axes)

    @property
    def dropped(self):
        return _to_qk(self.raw_dropped, self.axes)


@dataclass
class Observation:
    heads: list = field(default_factory=list)

    def applied_weights(self):
        """The weights multiplied into the values, per softmax call, (..., query, key): the matmul
        operand if seen, else the dropout output if seen, else the softmax output."""
        applied = [next(w for w in (h.applied, h.dropped, h.weights) if w is not None) for h in self.heads]
        return [a.reshape(h.weights.shape) if a.numel() == h.weights.numel() else a  # bmm on (B*H, T, T)
                for a, h in zip(applied, self.heads)]


def _softmax_dim(args, kwargs, ndim):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:  # torch's legacy implicit dim
        dim = 0 if ndim in (0, 1, 3) else 1
    return dim % ndim


def _einsum_terms(args):
    """(input subscripts per operand, output subscripts, operands), "..." expanded to letters."""
    equation, operands = args[0].replace(" ", ""), list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    spare = [c for c in string.ascii_letters if c not in equation]
    width = max((op.dim() - len(t.replace("...", "")) for t, op in zip(terms, operands) if "..." in t), default=0)
    ellipsis = "".join(spare[:width])
    terms = [t.replace("...", ellipsis[width - (op.dim() - len(t.replace("...", ""))):]) for t, op in zip(terms, operands)]
    if not _:  # implicit output: the ellipsis, then the letters that appear once, sorted
        once = sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1 and c not in ellipsis)
        rhs = ellipsis + "".join(once)
    return terms, rhs.replace("...", ellipsis), operands


class AttentionProbe(TorchFunctionMode):
    def __init__(self, num_tokens):
        super().__init__()
        self.num_tokens = num_tokens
        self.observation = Observation()
        self.error = None  # the first InternalError of the probe's own code
        self._open = None  # the head whose weights are waiting for their matmul
        self._derived = {}  # id -> tensor: the open softmax output and everything computed from it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            return self._sdpa(func, args, kwargs)
        if func is MHA_FORWARD:
            return self._mha_forward(func, args, kwargs)
        out = func(*args, **kwargs)  # the module's call: its exceptions are the module's
        if self._open is not None or func in SOFTMAX:  # (every other op: nothing to record, on the hot path)
            self._ours(self._record, func, args, kwargs, out)
        return out

    def _ours(self, fn, *args):
        """Run probe code: an exception is an InternalError of attnspec, kept in ``error``."""
        try:
            return fn(*args)
        except Exception as e:
            self.error = self.error or internal_error(e)
            raise self.error from e

    # --- softmax, dropout, matmul ------------------------------------------------------------------

    def _attention_axes(self, t, dim):
        """(query, key) axes if softmax over ``dim`` of ``t`` normalizes over num_tokens keys and ``t`` has
        another axis of num_tokens queries (the other of its last two axes if it can be), else None."""
        T = self.num_tokens
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[dim] != T:
            return None
        last_two = [a for a in (t.dim() - 2, t.dim() - 1) if a != dim]
        others = [a for a in range(t.dim()) if a != dim and t.shape[a] == T]
        preferred = [a for a in others if dim in (t.dim() - 2, t.dim() - 1) and a in last_two]
        return (preferred or others[-1:] or [None])[0], dim if others else None

    def _record(self, func, args, kwargs, out):
        if isinstance(out, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(out):
            return  # inside torch.func.vmap/grad: a wrapped tensor may not escape the transform, so nothing is kept
        if func in SOFTMAX and isinstance(out, torch.Tensor):
            dim = _softmax_dim(args, kwargs, out.dim())
            query, key = self._attention_axes(out, dim) or (None, None)
            if query is not None:
                self._open = Head(raw_scores=args[0].detach().clone(), raw_weights=out.detach().clone(), axes=(query, key))
                self.observation.heads.append(self._open)
                self._derived = {id(out): out}
                return
        if self._open is None:  # (most ops: nothing to follow, and flattening their arguments is the cost)
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        derived = [t for t in inputs if id(t) in self._derived and self._derived[id(t)] is t]
        if not derived:
            return
        if func in MATMUL or func in EINSUM:  # weights (or something computed from them) @ values
            operand = derived[0]
            axes = self._contraction_axes(func, args, operand)
            if axes is not None:
                head = self._open
                head.raw_applied, head.applied_axes = operand.detach().clone(), axes
                if operand.shape == head.raw_weights.shape and axes[1] == head.axes[1]:
                    if operand.shape[axes[0]] == self.num_tokens:
                        head.axes = axes  # the same layout: the consumer tells the query axis
                    else:  # its rows are not queries: e.g. query heads folded into the query axis ("packed GQA")
                        head.rows_axis = axes[0]
            self._open, self._derived = None, {}
            return
        if func in DROPOUT and isinstance(out, torch.Tensor) and out.shape == self._open.raw_weights.shape:
            self._open.raw_dropped = out.detach().clone()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._derived[id(t)] = t

    def _contraction_axes(self, func, args, operand):
        """(query, key) axes of the weights operand of a matmul or einsum with the values, or None."""
        nd = operand.dim()
        if nd < 2:
            return None
        if func in MATMUL:  # W @ V contracts W's last axis (the key); X @ W its second to last
            return (nd - 2, nd - 1) if args[0] is operand else (nd - 1, nd - 2)
        terms, output, operands = _einsum_terms(args)
        index = next(i for i, op in enumerate(operands) if op is operand)
        term, rest = terms[index], "".join(t for i, t in enumerate(terms) if i != index)
        T = self.num_tokens
        keys = [a for a, c in enumerate(term) if c not in output and operand.shape[a] == T]
        queries = [a for a, c in enumerate(term) if c in output and c not in rest and operand.shape[a] == T]
        return (queries[0], keys[0]) if len(keys) == 1 and len(queries) == 1 else None

    # --- fused kernels -----------------------------------------------------------------------------

    def _sdpa(self, func, args, kwargs):
        bound = {**SDPA_DEFAULTS, **dict(zip(SDPA_ARGS, args)), **kwargs}
        p = float(bound["dropout_p"])
        out = func(*args, **kwargs) if p == 0 else func(**{**bound, "dropout_p": 0.0})  # the module's errors
        weights = self._ours(self._sdpa_weights, bound)
        if weights is None:
            return out
        scores, weights = weights
        if p == 0:
            self._ours(self._fused_head, scores, weights, weights, None, "scaled_dot_product_attention", p)
            return out
        # dropout requested: the same computation, unfused, so the dropout applied is observable
        dropped = F.dropout(weights, p, training=True)
        value = self._ours(self._gqa, bound["value"], bound["query"], bound["enable_gqa"])
        unfused = (dropped.to(value.dtype) @ value).to(out.dtype)
        self._ours(self._fused_head, scores, weights, dropped, dropped, "scaled_dot_product_attention", p)
        return unfused

    @staticmethod
    def _gqa(t, query, enable_gqa):
        if enable_gqa and t.dim() >= 3 and t.shape[-3] != query.shape[-3]:
            return t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3)
        return t

    def _sdpa_weights(self, b):
        """(scores, weights) that SDPA's arguments determine, or None when they are not T x T."""
        q, k = b["query"], self._gqa(b["key"], b["query"], b["enable_gqa"])
        L, S = q.shape[-2], k.shape[-2]
        if (L, S) != (self.num_tokens, self.num_tokens):
            return None
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        scale = 1 / math.sqrt(q.shape[-1]) if b["scale"] is None else b["scale"]
        scores = (q.detach().to(compute) @ k.detach().to(compute).transpose(-2, -1)) * scale
        if b["is_causal"]:  # top-left aligned: query i attends keys j <= i
            scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), -math.inf)
        mask = b["attn_mask"]
        if mask is not None:
            mask = mask.detach()
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(compute)
        # scores stay in the compute precision: rounded to a half dtype at large values they no longer
        # determine the weights the kernel computed from the unrounded ones
        return scores, torch.softmax(scores, dim=-1).to(q.dtype)

    def _fused_head(self, scores, weights, applied, dropped, source, p):
        nd = weights.dim()
        self.observation.heads.append(Head(
            raw_scores=scores.detach().clone(), raw_weights=weights.detach().clone(), axes=(nd - 2, nd - 1),
            raw_applied=applied.detach().clone(), applied_axes=(nd - 2, nd - 1),
            raw_dropped=None if dropped is None else dropped.detach().clone(), source=source, dropout_p=p))
        self._open, self._derived = None, {}

    def _mha_forward(self, func, args, kwargs):
        bound = self._ours(lambda: inspect.signature(func).bind(*args, **kwargs).arguments)
        asked, average = bound.get("need_weights", True), bound.get("average_attn_weights", True)
        every = {**bound, "need_weights": True, "average_attn_weights": False}
        out, applied = func(**every)  # the module's call: its exceptions are the module's
        if applied is None or applied.shape[-2:] != (self.num_tokens, self.num_tokens):
            return (out, None if not asked else applied.mean(-3) if average and applied is not None else applied)
        training, p = bound.get("training", True), float(bound["dropout_p"])
        weights = func(**{**every, "training": False})[1] if training and p > 0 else applied
        self._ours(self._fused_head, _log_weights(weights), weights, applied, applied if training and p > 0 else None,
                   "multi_head_attention_forward", p if training else 0.0)
        return out, (applied.mean(-3) if average else applied) if asked else None


def _log_weights(weights):
    """Scores that give ``weights`` back under softmax: log(weights), with a zero weight (masked, or
    underflowed at large scores) at the dtype's most negative finite value instead of -inf, so it stays
    a past position whose weight is 0, not a masked one."""
    return torch.log(weights).clamp_min(torch.finfo(weights.dtype).min)

