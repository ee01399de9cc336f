"""The planted-bug corpus: small WRONG variants of the impl modules, one subtle change each.

Every class has its kind's constructor signature (``spec.kinds.Kind.constructor_args``), so it is a
target as it stands: ``attnspec check mha=tests/planted.py:ScaleByDOut``. ``CORPUS`` records, per
bug, the invariant ids that reject it (``catches``: the ones characteristic of the mistake and cheap
to shrink, checked on every run by tests/test_planted.py through the public check path; ``also``: the
others seen to reject it, checked with ``ATTNSPEC_PLANTED_ALL=1``) and its class of mistake.

``self.mask[-T:, -T:]`` is not a bug: the bottom-right T x T block of triu(ones(C, C), 1) is
triu(ones(T, T), 1).

To keep each bug to the line or two it changes, the attention modules are rebuilt from steps
(``_Steps``): project, split heads, scores, mask, scale+softmax, dropout, @ V, merge heads, out_proj.
The steps compose to exactly the impl module's forward (``CausalSteps``, ``MHASteps`` and
``SelfSteps`` are correct modules); a planted bug overrides one step. The wrapper and block variants
swap a buggy module into the impl's wrapper / block, or override the one line they change.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from attnspec.impl.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)
from attnspec.impl.gpt import GELU, LayerNorm, TransformerBlock
from attnspec.impl.modern import GroupedQueryAttention, rotate


# --- the correct modules, in steps -------------------------------------------------------------


class _Steps:
    """forward = out(merge(drop(normalize(mask(scores(q, k)))) @ v)), q, k, v = split(project(x))."""

    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        w = self.normalize(self.mask_scores(self.scores(q, k), T), k.shape[-1])
        return self.out(self.merge(self.drop(w) @ v, b, T))

    def project(self, x):
        return self.W_query(x), self.W_key(x), self.W_value(x)

    def split(self, t, b, T):
        return t

    def scores(self, q, k):
        return q @ k.transpose(-2, -1)

    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[:T, :T], -torch.inf)

    def normalize(self, s, d_k):
        return torch.softmax(s / d_k**0.5, dim=-1)

    def drop(self, w):
        return self.dropout(w)

    def merge(self, ctx, b, T):
        return ctx

    def out(self, ctx):
        return ctx


class SelfSteps(_Steps, SelfAttention_v2):
    def mask_scores(self, s, T):
        return s

    def drop(self, w):
        return w


class CausalSteps(_Steps, CausalAttention):
    pass


class MHASteps(_Steps, MultiHeadAttention):
    def split(self, t, b, T):
        return t.view(b, T, self.num_heads, self.head_dim).transpose(1, 2)

    def merge(self, ctx, b, T):
        return ctx.transpose(1, 2).contiguous().view(b, T, self.d_out)

    def out(self, ctx):
        return self.out_proj(ctx)


def _att_args(cfg):
    return cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["dropout"], cfg["num_heads"], cfg["qkv_bias"]


def _wrapper_of(head_cls, name):
    """The impl wrapper with heads of ``head_cls`` (a buggy single head)."""

    class Wrapper(MultiHeadAttentionWrapper):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
            super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
            self.heads = nn.ModuleList(
                [head_cls(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)])

    Wrapper.__name__ = Wrapper.__qualname__ = name
    return Wrapper


def _block_of(att_cls, name):
    """The impl block with ``att`` of ``att_cls`` (a buggy MHA)."""

    class Block(TransformerBlock):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.att = att_cls(*_att_args(cfg))

    Block.__name__ = Block.__qualname__ = name
    return Block


# --- scaling -------------------------------------------------------------------------------------


class NoScaling(MHASteps):
    def normalize(self, s, d_k):
        return torch.softmax(s, dim=-1)


class ScaleByDOut(MHASteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / self.d_out**0.5, dim=-1)  # sqrt(d_out), not sqrt(head_dim)


class ScaleByD(CausalSteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / d_k, dim=-1)  # d, not sqrt(d)


class ScaleAfterSoftmax(SelfSteps):
    def normalize(self, s, d_k):
        return torch.softmax(s, dim=-1) / d_k**0.5


class ScaleByNumTokens(SelfAttention_v1):
    def forward(self, x):
        keys, queries, values = x @ self.W_key, x @ self.W_query, x @ self.W_value
        return torch.softmax(queries @ keys.T / keys.shape[0] ** 0.5, dim=-1) @ values  # shape[0]: the tokens


class ScaleByDInHead(CausalSteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / self.d_in**0.5, dim=-1)  # the input width, not the key width


WrapperScaleByDIn = _wrapper_of(ScaleByDInHead, "WrapperScaleByDIn")
BlockNoScaling = _block_of(NoScaling, "BlockNoScaling")


# --- masking -------------------------------------------------------------------------------------


class MaskDiagonal(CausalSteps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = torch.triu(torch.ones_like(self.mask), diagonal=0)  # masks the diagonal too


class MaskRowsOnly(CausalSteps):
    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[:T], -torch.inf)  # (T, context_length): only right when T == C


class MaskSliceLeak(MHASteps):
    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[-T:, :T], -torch.inf)  # bottom-left block: leaks when T < C


class MaskFillZero(CausalSteps):
    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[:T, :T], 0.0)


class MultiplyMaskNoRenorm(MHASteps):
    def mask_scores(self, s, T):
        return s

    def normalize(self, s, d_k):
        T = s.shape[-1]
        return torch.softmax(s / d_k**0.5, dim=-1) * torch.tril(torch.ones(T, T, dtype=s.dtype))


class MaskWrongSide(MHASteps):
    def mask_scores(self, s, T):
        return s.masked_fill(torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1), -torch.inf)


class NoMask(MHASteps):
    def mask_scores(self, s, T):
        return s


class SelfAttentionMasked(SelfSteps):
    def mask_scores(self, s, T):  # a causal mask in the non-causal module
        return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)


WrapperMaskFillZero = _wrapper_of(MaskFillZero, "WrapperMaskFillZero")
BlockNoMask = _block_of(NoMask, "BlockNoMask")


# --- softmax -------------------------------------------------------------------------------------


class SoftmaxOverQueries(CausalSteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / d_k**0.5, dim=-2)


class SoftmaxOverHeads(MHASteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / d_k**0.5, dim=1)


class SoftmaxOverBatch(CausalSteps):
    def normalize(self, s, d_k):
        return torch.softmax(s / d_k**0.5, dim=0)


class NaiveSoftmax(SelfSteps):
    def normalize(self, s, d_k):
        e = torch.exp(s / d_k**0.5)  # no max subtraction: overflows
        return e / e.sum(dim=-1, keepdim=True)


class SoftmaxMaxOverBatch(CausalSteps):
    def normalize(self, s, d_k):
        s = s / d_k**0.5
        e = torch.exp(s - s.amax(dim=(0, -1), keepdim=True))  # the max of the whole batch, not of the row
        return e / e.sum(dim=-1, keepdim=True)


class NaiveSoftmaxMHA(MHASteps):
    def normalize(self, s, d_k):
        e = torch.exp(s / d_k**0.5)
        return e / e.sum(dim=-1, keepdim=True)


# --- dropout -------------------------------------------------------------------------------------


class DropoutInEval(CausalSteps):
    def drop(self, w):
        return F.dropout(w, self.dropout.p, training=True)


class DropoutNoRescale(CausalSteps):
    def drop(self, w):
        return w * (torch.rand_like(w) >= self.dropout.p) if self.training else w


class DropoutNoRescaleFiniteMask(DropoutNoRescale):
    """DropoutNoRescale with Hugging Face's mask fill, finfo(dtype).min: a fill is a score too, and once the
    tolerance for rounding the scores counted it, it allowed anything (a review of the seventh session)."""

    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[:T, :T], torch.finfo(s.dtype).min)


class DropoutFixedHalf(MHASteps):
    def drop(self, w):
        return F.dropout(w, 0.5, self.training)  # ignores the dropout argument


class DropoutOnScores(CausalSteps):
    def scores(self, q, k):
        return self.dropout(q @ k.transpose(-2, -1))

    def drop(self, w):
        return w


class DropoutOnValues(CausalSteps):
    def project(self, x):
        return self.W_query(x), self.W_key(x), self.dropout(self.W_value(x))

    def drop(self, w):
        return w


class DropoutOnContext(MHASteps):
    def drop(self, w):
        return w

    def out(self, ctx):
        return self.out_proj(self.dropout(ctx))


class DropoutKeepProb(CausalSteps):
    def drop(self, w):
        return F.dropout(w, 1 - self.dropout.p, self.training)  # p read as the keep probability


class DropoutMaskSharedAcrossBatch(CausalSteps):
    def drop(self, w):
        keep = torch.rand(w.shape[-2:]) >= self.dropout.p  # one (T, T) mask for the whole batch
        return w * keep / (1 - self.dropout.p) if self.training else w


class DoubleDropout(MHASteps):
    def out(self, ctx):
        return self.out_proj(self.dropout(ctx))  # the weights are dropped, and the context again


WrapperDropoutNoRescale = _wrapper_of(DropoutNoRescale, "WrapperDropoutNoRescale")


# --- head split and merge (mha) ------------------------------------------------------------------


class SplitWithoutTranspose(MHASteps):
    def split(self, t, b, T):
        return t.view(b, self.num_heads, T, self.head_dim)


class MergeWithoutTranspose(MHASteps):
    def merge(self, ctx, b, T):
        return ctx.contiguous().view(b, T, self.d_out)


class MergeWrongOrder(MHASteps):
    def merge(self, ctx, b, T):
        return ctx.permute(0, 2, 3, 1).contiguous().view(b, T, self.d_out)  # (b, T, hd, H): interleaved


class InterleavedHeads(MHASteps):
    def split(self, t, b, T):
        return t.view(b, T, self.head_dim, self.num_heads).permute(0, 3, 1, 2)  # head h: columns h::H


class NoOutProj(MHASteps):
    def out(self, ctx):
        return ctx


class OutProjNoBias(MHASteps):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=False)


# --- projections ---------------------------------------------------------------------------------


class KeyValueSwapped(SelfSteps):
    def project(self, x):
        return self.W_query(x), self.W_value(x), self.W_key(x)


class QueryKeySwapped(MHASteps):
    def project(self, x):
        return self.W_key(x), self.W_query(x), self.W_value(x)


class ValueWeightForKeys(CausalSteps):
    def project(self, x):
        return self.W_query(x), self.W_value(x), self.W_value(x)


class ValueBiasTwice(CausalSteps):
    def project(self, x):
        v = self.W_value(x)
        return self.W_query(x), self.W_key(x), v if self.W_value.bias is None else v + self.W_value.bias


class BiasAlwaysOn(CausalSteps):
    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, qkv_bias=True)


class BiasIgnored(MHASteps):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads)  # qkv_bias dropped


class V1TransposedWeights(SelfAttention_v1):
    def forward(self, x):
        q, k, v = x @ self.W_query.T, x @ self.W_key.T, x @ self.W_value.T  # W is (d_in, d_out)
        return torch.softmax(q @ k.T / k.shape[-1] ** 0.5, dim=-1) @ v


class HiddenValueBias(CausalSteps):
    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, qkv_bias)
        self.value_bias = nn.Parameter(torch.randn(d_out) * 0.1)  # outside W_value: an extra, hidden bias

    def project(self, x):
        return self.W_query(x), self.W_key(x), self.W_value(x) + self.value_bias


class CachedQK(SelfAttention_v1):
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.register_buffer("W_qk", (self.W_query @ self.W_key.T).detach())  # fused once, at construction

    def forward(self, x):
        scores = x @ self.W_qk @ x.T  # = (x W_q)(x W_k)^T while the cache is fresh; stale after a weight transfer
        return torch.softmax(scores / self.W_key.shape[-1] ** 0.5, dim=-1) @ (x @ self.W_value)


# --- the wrapper ---------------------------------------------------------------------------------


class CatWrongDim(MultiHeadAttentionWrapper):
    def forward(self, x):
        b, T, _ = x.shape
        return torch.cat([head(x) for head in self.heads], dim=1).reshape(b, T, -1)


class SharedHead(MultiHeadAttentionWrapper):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.heads = nn.ModuleList([self.heads[0]] * num_heads)


class CopiedHeads(MultiHeadAttentionWrapper):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self.heads = nn.ModuleList([copy.deepcopy(self.heads[0]) for _ in range(num_heads)])


class HeadsReversed(MultiHeadAttentionWrapper):
    def forward(self, x):
        return torch.cat([head(x) for head in reversed(self.heads)], dim=-1)


class OneHeadShort(MultiHeadAttentionWrapper):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, max(num_heads - 1, 1), qkv_bias)


# --- batch handling ------------------------------------------------------------------------------


class MergeMixesBatch(MHASteps):
    def merge(self, ctx, b, T):
        return ctx.transpose(1, 2).contiguous().view(T, b, self.d_out).transpose(0, 1)


class SqueezedOutput(CausalAttention):
    def forward(self, x):
        return super().forward(x).squeeze()  # meant to drop a batch of 1; drops every size-1 dim


class FirstElementOnly(CausalAttention):
    def forward(self, x):
        return super().forward(x[:1]).expand(x.shape[0], -1, -1)


class ScoresNormalizedOverBatch(CausalSteps):
    def scores(self, q, k):
        s = q @ k.transpose(-2, -1)
        return s - s.mean(dim=0, keepdim=True)  # "centre the scores": over the batch, not the row


class BatchLayerNorm(LayerNorm):
    def forward(self, x):
        mean = x.mean(dim=(0, -1), keepdim=True)  # statistics over the batch too
        var = x.var(dim=(0, -1), keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class TokenLayerNorm(LayerNorm):
    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)  # dim=1, written for (num_tokens, emb_dim): the tokens of a batch
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


# --- numerics ------------------------------------------------------------------------------------


class Float32Output(SelfSteps):
    def forward(self, x):
        return super().forward(x).to(torch.float32)


class HalfPrecisionScores(CausalSteps):
    def scores(self, q, k):
        return (q.half() @ k.half().transpose(-2, -1)).to(q.dtype)


class SoftmaxDenominatorEps(MHASteps):
    def normalize(self, s, d_k):
        e = torch.softmax(s / d_k**0.5, dim=-1)
        return e / (e.sum(dim=-1, keepdim=True) + 1e-6)  # "safe" renormalization


# --- the block's structure -----------------------------------------------------------------------


class _BlockWithNorm(TransformerBlock):
    norm_cls = LayerNorm

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norm1, self.norm2 = self.norm_cls(cfg["emb_dim"]), self.norm_cls(cfg["emb_dim"])


class PostLN(TransformerBlock):
    def forward(self, x):
        x = self.norm1(x + self.drop_shortcut(self.att(x)))
        return self.norm2(x + self.drop_shortcut(self.ff(x)))


class NoAttentionResidual(TransformerBlock):
    def forward(self, x):
        x = self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class NoFeedForwardResidual(TransformerBlock):
    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return self.drop_shortcut(self.ff(self.norm2(x)))


class ResidualDropped(TransformerBlock):
    """Found by an outside reviewer: the residual dropout applied to the sum, so x itself is dropped."""

    def forward(self, x):
        x = self.drop_shortcut(x + self.att(self.norm1(x)))
        return self.drop_shortcut(x + self.ff(self.norm2(x)))


class UnbiasedVarNorm(LayerNorm):
    def forward(self, x):
        var = x.var(dim=-1, keepdim=True, unbiased=True)
        return self.scale * (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(var + self.eps) + self.shift


class Eps1e6Norm(LayerNorm):
    def __init__(self, emb_dim):
        super().__init__(emb_dim)
        self.eps = 1e-6


class NoEpsNorm(LayerNorm):
    def __init__(self, emb_dim):
        super().__init__(emb_dim)
        self.eps = 0.0


class SwappedScaleShiftNorm(LayerNorm):
    def forward(self, x):
        norm_x = (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + self.eps)
        return self.shift * norm_x + self.scale


class LayerNormUnbiased(_BlockWithNorm):
    norm_cls = UnbiasedVarNorm


class LayerNormEps1e6(_BlockWithNorm):
    norm_cls = Eps1e6Norm


class LayerNormNoEps(_BlockWithNorm):
    norm_cls = NoEpsNorm


class LayerNormScaleShiftSwapped(_BlockWithNorm):
    norm_cls = SwappedScaleShiftNorm


class LayerNormOverBatch(_BlockWithNorm):
    norm_cls = BatchLayerNorm


class LayerNormOverTokens(_BlockWithNorm):
    norm_cls = TokenLayerNorm


class SharedNorm(TransformerBlock):
    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm1(x)))  # norm1 again: norm2 is never used


class GELUErf(TransformerBlock):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.ff.layers[1] = nn.GELU()  # exact erf GELU, not GPT-2's tanh approximation


class ReLUFeedForward(TransformerBlock):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.ff.layers[1] = nn.ReLU()


class FeedForward2x(TransformerBlock):
    def __init__(self, cfg):
        super().__init__(cfg)
        emb = cfg["emb_dim"]
        self.ff.layers = nn.Sequential(nn.Linear(emb, 2 * emb), GELU(), nn.Linear(2 * emb, emb))


class ResidualDropoutInEval(TransformerBlock):
    def forward(self, x):
        p = self.drop_shortcut.p
        x = x + F.dropout(self.att(self.norm1(x)), p, training=True)
        return x + F.dropout(self.ff(self.norm2(x)), p, training=True)


class BranchDropoutNotRescaled(TransformerBlock):
    """Found by red-team pass 4: the branch dropout keeps with probability 1-p but never scales by 1/(1-p)."""

    def forward(self, x):
        def drop(h):
            return h * (torch.rand_like(h) >= self.drop_shortcut.p) if self.training else h

        x = x + drop(self.att(self.norm1(x)))
        return x + drop(self.ff(self.norm2(x)))


class FeedForwardNeverDropped(TransformerBlock):
    """Found by red-team pass 5: the feed-forward branch is added undropped (and its sub-layer has no dropout)."""

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.ff(self.norm2(x))


# --- input and state mutation --------------------------------------------------------------------


class InPlaceResidual(TransformerBlock):
    def forward(self, x):
        x += self.drop_shortcut(self.att(self.norm1(x)))  # mutates the caller's tensor
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class QueryScaledInPlace(CausalSteps):
    def project(self, x):
        k, v = self.W_key(x), self.W_value(x)
        return self.W_query(x.mul_(self.d_out**-0.5)), k, v  # fold 1/sqrt(d) into the input, in place

    def normalize(self, s, d_k):
        return torch.softmax(s, dim=-1)


class MaskBufferEdited(MHASteps):
    def mask_scores(self, s, T):
        mask = self.mask[:T, :T]
        mask.masked_fill_(mask.bool(), -torch.inf)  # turn the 0/1 buffer into an additive mask, in place
        return s + mask


class SelfAttentionNormalizesInput(SelfSteps):
    def project(self, x):
        x /= x.norm(dim=-1, keepdim=True).clamp_min(1.0)  # in-place "safety" normalization of the input
        return super().project(x)


# --- gradient bugs: the forward is right, training is not ----------------------------------------


class DetachedKeys(MHASteps):
    def project(self, x):
        return self.W_query(x), self.W_key(x).detach(), self.W_value(x)


class DetachedValues(CausalSteps):
    def project(self, x):
        return self.W_query(x), self.W_key(x), self.W_value(x).detach()


class ScoresUnderNoGrad(CausalSteps):
    def scores(self, q, k):
        with torch.no_grad():  # "scores need no gradient": cuts W_query and W_key off
            return q @ k.transpose(-2, -1)


class FrozenValueWeight(MHASteps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.W_value.weight.requires_grad_(False)


class _SoftmaxForgetsCentering(torch.autograd.Function):
    """softmax with a hand-written backward that returns y * g, forgetting the - y * sum(g * y) term."""

    @staticmethod
    def forward(ctx, scores):
        y = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y * grad


class CustomSoftmaxWrongBackward(MHASteps):
    def normalize(self, s, d_k):
        return _SoftmaxForgetsCentering.apply(s / d_k**0.5)


class QueryWeightData(CausalSteps):
    def project(self, x):  # .data "to save memory": W_query's weight never gets a gradient
        return F.linear(x, self.W_query.weight.data, self.W_query.bias), self.W_key(x), self.W_value(x)


class FusedQKVDetachedValues(nn.Module):
    """nanoGPT-style fused c_attn (no projections found: only black-box checks apply) whose values are
    detached: c_attn still gets a gradient through the queries and keys."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.c_proj = nn.Linear(d_out, d_out)
        self.drop = nn.Dropout(dropout)
        self.n_head, self.d_out = num_heads, d_out

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.d_out, dim=2)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v.detach()))
        att = (q @ k.transpose(-2, -1)) / k.shape[-1] ** 0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), -torch.inf)
        y = self.drop(torch.softmax(att, dim=-1)) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.d_out))


class _AttentionForgetsScaleInBackward(torch.autograd.Function):
    """A hand-written attention (flash-style) whose backward forgets the 1/sqrt(d) in dQ and dK."""

    @staticmethod
    def forward(ctx, q, k, v, future):
        w = torch.softmax((q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(future, -torch.inf), dim=-1)
        ctx.save_for_backward(q, k, v, w)
        return w @ v

    @staticmethod
    def backward(ctx, g):
        q, k, v, w = ctx.saved_tensors
        dw = g @ v.transpose(-2, -1)
        ds = w * (dw - (dw * w).sum(-1, keepdim=True))  # d scores; the 1/sqrt(d) is missing below
        return ds @ k, ds.transpose(-2, -1) @ q, w.transpose(-2, -1) @ g, None


class HandWrittenBackwardNoScale(MHASteps):
    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        ctx = _AttentionForgetsScaleInBackward.apply(q, k, v, self.mask.bool()[:T, :T])
        return self.out(self.merge(ctx, b, T))  # (no dropout: a bug of its own, not this one)


class QueryChunksMaskNotShifted(MHASteps):
    """Found by red-team pass 6: past 256 tokens the queries go in chunks of 256, each chunk's causal mask taken
    from the top-left of the buffer instead of shifted to the chunk's first query (exact up to 256 tokens)."""

    def mask_scores(self, s, T):
        if T <= 256:
            return super().mask_scores(s, T)
        chunks = [s[..., i:i + 256, :].masked_fill(self.mask.bool()[:min(256, T - i), :T], -torch.inf)
                  for i in range(0, T, 256)]
        return torch.cat(chunks, dim=-2)


class _SoftmaxDropoutForgetsScaleInBackward(torch.autograd.Function):
    """softmax then inverted dropout, fused; the backward multiplies by the keep mask but not by 1/(1-p)."""

    @staticmethod
    def forward(ctx, s, p):
        w = torch.softmax(s, dim=-1)
        keep = (torch.rand_like(w) >= p).to(w.dtype) if p > 0 else torch.ones_like(w)
        ctx.save_for_backward(w, keep)
        return w * keep / (1 - p)

    @staticmethod
    def backward(ctx, grad):
        w, keep = ctx.saved_tensors
        g = grad * keep  # should be grad * keep / (1 - p)
        return w * (g - (w * g).sum(-1, keepdim=True)), None


class FusedSoftmaxDropoutBackwardUnscaled(MHASteps):
    """Found by red-team pass 5: right forward, gradients through the scores too small by (1-p) in train mode."""

    def normalize(self, s, d_k):
        return s / d_k**0.5

    def drop(self, s):
        return _SoftmaxDropoutForgetsScaleInBackward.apply(s, self.dropout.p if self.training else 0.0)


# --- call history: right on the first call, wrong on a later one ----------------------------------


class ShapeCachedKV(MHASteps):
    def project(self, x):
        cache = self.__dict__.setdefault("_kv_by_shape", {})
        if tuple(x.shape) not in cache:  # keys and values "cached" by shape: the first input of a shape wins
            cache[tuple(x.shape)] = (self.W_key(x), self.W_value(x))
        return (self.W_query(x), *cache[tuple(x.shape)])


class MaskFromFirstCall(CausalSteps):
    def mask_scores(self, s, T):
        if self.__dict__.get("_additive") is None:  # built at the first call's length; a 1-token call makes it [[0]]
            self._additive = torch.full((T, T), -torch.inf, device=s.device).triu(1)
        return s + self._additive[:T, :T]


class TrainMaskReusedInEval(CausalSteps):
    def drop(self, w):
        if self.training:
            self._last_mask = (torch.rand_like(w) >= self.dropout.p) / (1 - self.dropout.p)
            return w * self._last_mask
        last = self.__dict__.get("_last_mask")
        return w * last if last is not None and last.shape == w.shape else w  # reapplied after .eval()


class LazyFusedQK(SelfAttention_v1):
    def forward(self, x):
        if self.__dict__.get("_w_qk") is None:  # fused at the first call, never refreshed
            self._w_qk = self.W_query @ self.W_key.T
        scores = x @ self._w_qk @ x.T
        return torch.softmax(scores / self.W_key.shape[-1] ** 0.5, dim=-1) @ (x @ self.W_value)


class FusedQKVWatchesQueryOnly(MHASteps):
    def project(self, x):
        version = self.W_query.weight._version  # the fused weight is rebuilt when W_query changes, not W_key or W_value
        if self.__dict__.get("_fused_version") != version:
            self._fused = torch.cat([self.W_query.weight, self.W_key.weight, self.W_value.weight]).detach().clone()
            self._fused_version = version
        biases = [m.bias for m in (self.W_query, self.W_key, self.W_value)]
        bias = None if biases[0] is None else torch.cat(biases)
        return F.linear(x, self._fused, bias).chunk(3, dim=-1) if not torch.is_grad_enabled() else super().project(x)


class ReseededDropout(CausalSteps):
    def drop(self, w):
        if not self.training:
            return w
        generator = torch.Generator(device=w.device).manual_seed(0)  # reseeded in every call: same positions
        keep = torch.rand(w.shape, generator=generator, device=w.device) >= self.dropout.p
        return w * keep / (1 - self.dropout.p)


class PrivateGeneratorDropout(CausalSteps):
    def drop(self, w):
        if not self.training:
            return w
        if not hasattr(self, "generator"):  # seeded once: torch.manual_seed neither reproduces nor varies its masks
            self.generator = torch.Generator(device=w.device).manual_seed(0)
        keep = torch.rand(w.shape, generator=self.generator, device=w.device) >= self.dropout.p
        return w * keep / (1 - self.dropout.p)


class IgnoresDropout(MHASteps):
    def drop(self, w):
        return w  # stores its dropout, never applies it (litgpt's attention)


class SDPANoDropout(MultiHeadAttention):
    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (p(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.W_query, self.W_key, self.W_value))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)  # p dropped in train mode too
        return self.out_proj(ctx.transpose(1, 2).reshape(b, T, self.d_out))


class GenerationCacheKeptInTrain(CausalSteps):
    def project(self, x):
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        cache = self.__dict__.get("_generation_kv")
        if not self.training:
            self._generation_kv = (k.detach(), v.detach())  # a generation cache, filled in eval mode
        elif cache is not None and cache[0].shape == k.shape:
            k, v = cache  # never cleared on .train(): training sees the last eval input's keys and values
        return q, k, v


# --- dropout masks shared --------------------------------------------------------------------------


class DropoutMaskSharedAcrossHeads(MHASteps):
    def drop(self, w):
        keep = torch.rand(w.shape[0], 1, *w.shape[-2:], device=w.device) >= self.dropout.p  # one mask per element
        return w * keep / (1 - self.dropout.p) if self.training else w


class DropoutMaskSharedAcrossBatchMHA(MHASteps):
    def drop(self, w):
        keep = torch.rand(1, *w.shape[1:], device=w.device) >= self.dropout.p  # one (H, T, T) mask for the batch
        return w * keep / (1 - self.dropout.p) if self.training else w

# --- size-dependent bugs (issue 9: sizes, inputs and dtypes) -------------------------------------


class _OnlineSoftmaxMHA(MHASteps):
    """Flash-style attention, correct as written: keys in blocks of BLOCK, a running row max m,
    denominator l and context acc; softmax is never called. The bugs below override one step."""

    BLOCK = 16

    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        q = q / self.head_dim**0.5
        m = torch.full((*q.shape[:-1], 1), -torch.inf, dtype=q.dtype)
        l, acc = torch.zeros_like(m), torch.zeros_like(q)
        rows = torch.arange(T).unsqueeze(-1)
        for start in range(0, T, self.BLOCK):
            s = q @ k[..., start:start + self.BLOCK, :].transpose(-2, -1)
            s = s.masked_fill(self.block_future(rows, start, s.shape[-1]), -torch.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # finite: key 0 is in every row's past
            p = torch.exp(s - m_new)
            l, acc = self.rescale(l, acc, torch.exp(m - m_new))
            l = l + p.sum(-1, keepdim=True)
            acc = acc + self.drop(p) @ v[..., start:start + self.BLOCK, :]
            m = m_new
        return self.out(self.merge(acc / l, b, T))

    def block_future(self, rows, start, width):
        return torch.arange(start, start + width) > rows  # key j > query i

    def rescale(self, l, acc, alpha):
        return l * alpha, acc * alpha


class OnlineSoftmaxNoRescale(_OnlineSoftmaxMHA):
    def rescale(self, l, acc, alpha):
        return l, acc * alpha  # the denominator keeps the old block's max: wrong once a later block has a larger score


class OnlineSoftmaxBlock32MaskOffByOne(_OnlineSoftmaxMHA):
    BLOCK = 32

    def block_future(self, rows, start, width):
        second = (rows >= self.BLOCK) & (rows < 2 * self.BLOCK)  # query rows 32..63: offset by one
        return torch.arange(start, start + width) > rows + second.long()


class MaskBufferCapped16(MHASteps):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        n = min(context_length, 16)  # "the mask never needs more than 16 rows"
        self.register_buffer("mask", torch.triu(torch.ones(n, n), diagonal=1))

    def mask_scores(self, s, T):
        mask = self.mask.bool()
        if T > mask.shape[0]:  # longer sequence: pad the cached mask (with False: the rest is not masked)
            mask = F.pad(mask, (0, T - mask.shape[0], 0, T - mask.shape[0]))
        return s.masked_fill(mask[:T, :T], -torch.inf)


class SlidingWindow8(MHASteps):
    def mask_scores(self, s, T):
        i, j = torch.arange(T).unsqueeze(-1), torch.arange(T)
        return s.masked_fill((j > i) | (j <= i - 8), -torch.inf)  # a local window of 8 nobody asked for


class FastPathDropoutInEval(MHASteps):
    def forward(self, x):
        if self.head_dim < 8:
            return super().forward(x)
        b, T = x.shape[0], x.shape[-2]  # "fast path": the fused kernel, dropout_p not gated on self.training
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p, is_causal=True)
        return self.out(self.merge(ctx, b, T))


class MicroBatchWrongIndex(CausalAttention):
    def forward(self, x):
        out = x.new_empty(x.shape[0], x.shape[1], self.d_out)
        for step, start in enumerate(range(0, x.shape[0], 4)):  # micro-batches of 4
            n = min(4, x.shape[0] - start)
            out[start:start + n] = super().forward(x[step:step + n])  # step, not start: wrong from batch 5 on
        return out


class OnePassVarianceNorm(LayerNorm):
    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = (x * x).mean(dim=-1, keepdim=True) - mean**2  # E[x^2] - E[x]^2: cancels on off-centre input
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class LayerNormOnePassVariance(_BlockWithNorm):
    norm_cls = OnePassVarianceNorm


class MaskFillMinus1e4(MHASteps):
    def mask_scores(self, s, T):
        return s.masked_fill(self.mask.bool()[:T, :T], -1e4)  # "large enough": not at scores ~1e4


class Float16MaskNaN(MHASteps):
    def mask_scores(self, s, T):
        fill = torch.tensor(-1e9).to(s.dtype)  # -inf in float16
        return s + self.mask[:T, :T].to(s.dtype) * fill  # 0 * -inf = NaN at every kept position


class HalfPrecisionSoftmax(MHASteps):
    def normalize(self, s, d_k):
        return torch.softmax((s / d_k**0.5).half(), dim=-1).to(s.dtype)  # "saves memory"; float32 input loses bits


class BlockLocalMaxSoftmax(MHASteps):
    def normalize(self, s, d_k):
        s = s / d_k**0.5
        e = torch.exp(s - s[..., :32].amax(-1, keepdim=True))  # the max of the first 32 keys only
        return e / e.sum(-1, keepdim=True)  # exact up to 32 tokens; overflows past them at large scores


class KeyChunksDropTail(MHASteps):
    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        s = self.mask_scores(self.scores(q, k), T) / self.head_dim**0.5
        m = s.amax(-1, keepdim=True)
        num, den = 0.0, 0.0
        for start in range(0, T - T % 16 or T, 16):  # chunks of 16 keys; a partial last chunk is dropped
            e = torch.exp(s[..., start:start + 16] - m)
            num, den = num + self.drop(e) @ v[..., start:start + 16, :], den + e.sum(-1, keepdim=True)
        return self.out(self.merge(num / den, b, T))


# --- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    kind: str
    name: str  # the attribute of this file: the target is f"{kind}=tests/planted.py:{name}"
    cls: type
    catches: tuple  # invariant ids that reject it: tests/test_planted.py checks each fails
    bug_class: str
    note: str
    also: tuple = ()  # further invariants seen to reject it, slower to shrink: checked with ATTNSPEC_PLANTED_ALL=1


SA, CA, WR, MHA, TB = "self-attention", "causal-attention", "mha-wrapper", "mha", "transformer-block"


def _bug(kind, cls, bug_class, catches, note, also=()):
    return Planted(kind, cls.__name__, cls, tuple(catches), bug_class, note, tuple(also))


CORPUS = [
    # scaling
    _bug(MHA, NoScaling, "scaling", ["scaling-sqrt-head-dim"], "softmax(QK^T) without 1/sqrt(head_dim)",
         also=["head-split-equivalence", "oracle-float64"]),
    _bug(MHA, ScaleByDOut, "scaling", ["scaling-sqrt-head-dim"],
         "divides by sqrt(d_out) instead of sqrt(head_dim): only shows with num_heads > 1",
         also=["head-split-equivalence", "oracle-float64"]),
    _bug(CA, ScaleByD, "scaling", ["scaling-sqrt-head-dim"], "divides the scores by d instead of sqrt(d)",
         also=["oracle-float64"]),
    _bug(SA, ScaleAfterSoftmax, "scaling", ["weights-rows-sum-to-one"],
         "divides the softmax output, not its input, by sqrt(d)",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(WR, WrapperScaleByDIn, "scaling", ["scaling-sqrt-head-dim"],
         "heads scale by sqrt(d_in) instead of sqrt(d_out): only shows with d_in != d_out",
         also=["oracle-float64"]),
    _bug(TB, BlockNoScaling, "scaling", ["scaling-sqrt-head-dim"], "the block's attention does not scale",
         also=["oracle-float64"]),
    _bug(SA, ScaleByNumTokens, "scaling", ["scaling-sqrt-head-dim"],
         "SelfAttention_v1 divides by sqrt(keys.shape[0]), the number of tokens: right only when num_tokens == d_out",
         also=["oracle-float64"]),
    # masking
    _bug(CA, MaskDiagonal, "masking", ["finite-output", "weights-rows-sum-to-one", "oracle-float64"],
         "triu(diagonal=0): the diagonal is masked, row 0 is all -inf (NaN)",
         also=["weights-future-zero", "gradient-causality", "masked-softmax-renormalized", "scaling-sqrt-head-dim"]),
    _bug(CA, MaskRowsOnly, "masking", ["output-contract"],
         "mask[:T] without the column slice: crashes whenever num_tokens < context_length",
         also=["finite-output", "eval-deterministic", "causal-perturbation", "oracle-float64", "weight-transfer"]),
    _bug(MHA, MaskSliceLeak, "masking", ["prefix-consistency"],
         "mask[-T:, :T]: the wrong block of the buffer, leaks the future when num_tokens < context_length",
         also=["causal-perturbation", "gradient-causality", "weights-future-zero", "masked-softmax-renormalized",
               "head-split-equivalence", "oracle-float64"]),
    _bug(CA, MaskFillZero, "masking",
         ["causal-perturbation", "prefix-consistency", "gradient-causality", "weights-future-zero"],
         "masked_fill with 0 instead of -inf: future tokens keep weight",
         also=["masked-softmax-renormalized", "oracle-float64"]),
    _bug(MHA, MultiplyMaskNoRenorm, "masking", ["causal-perturbation", "masked-softmax-renormalized"],
         "softmax, then multiply by tril, without renormalizing the rows",
         also=["weights-rows-sum-to-one", "prefix-consistency", "gradient-causality", "head-split-equivalence",
               "oracle-float64"]),
    _bug(MHA, MaskWrongSide, "masking", ["causal-perturbation"],
         "tril(diagonal=-1): masks the past and keeps the future",
         also=["weights-future-zero", "prefix-consistency", "gradient-causality", "masked-softmax-renormalized",
               "scaling-sqrt-head-dim", "head-split-equivalence", "oracle-float64"]),
    _bug(MHA, NoMask, "masking", ["causal-perturbation", "gradient-causality"], "no causal mask at all",
         also=["weights-future-zero", "prefix-consistency", "masked-softmax-renormalized", "head-split-equivalence",
               "oracle-float64"]),
    _bug(SA, SelfAttentionMasked, "masking", ["permutation-equivariance"],
         "a causal mask in the non-causal self-attention",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(WR, WrapperMaskFillZero, "masking", ["causal-perturbation"], "the wrapper's heads fill the mask with 0",
         also=["weights-future-zero", "prefix-consistency", "gradient-causality", "masked-softmax-renormalized",
               "oracle-float64"]),
    _bug(TB, BlockNoMask, "masking", ["causal-perturbation"], "the block's attention is not causal",
         also=["weights-future-zero", "prefix-consistency", "gradient-causality", "masked-softmax-renormalized",
               "oracle-float64"]),
    # softmax
    _bug(CA, SoftmaxOverQueries, "softmax", ["weights-rows-sum-to-one", "causal-perturbation"],
         "softmax over dim=-2 (the queries)",
         also=["prefix-consistency", "gradient-causality", "masked-softmax-renormalized", "scaling-sqrt-head-dim",
               "oracle-float64"]),
    _bug(MHA, SoftmaxOverHeads, "softmax", ["finite-output", "weights-rows-sum-to-one"],
         "softmax over dim=1 (the heads)",
         also=["gradient-causality", "weights-future-zero", "masked-softmax-renormalized", "scaling-sqrt-head-dim",
               "head-split-equivalence", "oracle-float64"]),
    _bug(CA, SoftmaxOverBatch, "softmax", ["batch-independence"], "softmax over dim=0 (the batch)",
         also=["weights-rows-sum-to-one", "finite-output", "gradient-causality", "weights-future-zero",
               "masked-softmax-renormalized", "scaling-sqrt-head-dim", "dropout-unbiased", "oracle-float64"]),
    _bug(SA, NaiveSoftmax, "softmax", ["finite-output"],
         "exp(s) / sum exp(s) without subtracting the max: overflows for large inputs"),
    _bug(MHA, NaiveSoftmaxMHA, "softmax", ["finite-output"], "naive exp/sum softmax in multi-head attention"),
    _bug(CA, SoftmaxMaxOverBatch, "softmax", ["finite-output"],
         "exp/sum softmax stabilized with the max over the batch: rows of a small batch element underflow to 0/0"),
    # dropout
    _bug(CA, DropoutInEval, "dropout", ["eval-deterministic"], "F.dropout(training=True): drops in eval mode too",
         also=["oracle-float64", "prefix-consistency", "batch-independence", "weights-rows-sum-to-one",
               "masked-softmax-renormalized", "dropout-on-weights", "dropout-unbiased"]),
    _bug(CA, DropoutNoRescale, "dropout", ["dropout-on-weights", "dropout-unbiased"],
         "multiplies by a keep mask without the 1/(1-p) rescale"),
    _bug(CA, DropoutNoRescaleFiniteMask, "dropout", ["dropout-on-weights"],
         "kept weights not divided by 1 - p, the mask filled with finfo(dtype).min"),
    _bug(MHA, DropoutFixedHalf, "dropout", ["train-p0-equals-eval"],
         "hard-codes p=0.5, ignoring the dropout argument (unbiased all the same)",
         also=["dropout-on-weights"]),
    _bug(CA, DropoutOnScores, "dropout", ["dropout-on-weights"], "dropout on the scores, before softmax",
         also=["dropout-unbiased"]),
    _bug(CA, DropoutOnValues, "dropout", ["dropout-on-weights"],
         "dropout on the values instead of the weights: unbiased, so only the weight-level check sees it"),
    _bug(MHA, DropoutOnContext, "dropout", ["dropout-on-weights"],
         "dropout on the context vectors (before out_proj) instead of the weights"),
    _bug(WR, WrapperDropoutNoRescale, "dropout", ["dropout-on-weights", "dropout-unbiased"],
         "the wrapper's heads drop without rescaling"),
    _bug(CA, DropoutKeepProb, "dropout", ["train-p0-equals-eval"],
         "F.dropout(w, 1 - p): reads p as the keep probability",
         also=["dropout-on-weights"]),
    _bug(CA, DropoutMaskSharedAcrossBatch, "dropout", ["dropout-unbiased"],
         "one (T, T) keep mask shared by the batch: each element is right, the draws are not independent"),
    # head split and merge
    _bug(MHA, SplitWithoutTranspose, "heads", ["head-split-equivalence"],
         "view(b, H, T, hd) without the transpose: heads see scrambled tokens",
         also=["causal-perturbation", "prefix-consistency", "gradient-causality", "scaling-sqrt-head-dim",
               "oracle-float64"]),
    _bug(MHA, MergeWithoutTranspose, "heads", ["head-split-equivalence"],
         "merges (b, H, T, hd) with .view, without transposing back",
         also=["causal-perturbation", "prefix-consistency", "gradient-causality", "oracle-float64"]),
    _bug(MHA, MergeWrongOrder, "heads", ["head-split-equivalence"],
         "merges with permute(0, 2, 3, 1): head_dim-major, the heads' columns interleaved",
         also=["oracle-float64"]),
    _bug(MHA, InterleavedHeads, "heads", ["head-split-equivalence"],
         "view(b, T, hd, H): head h takes columns h, h+H, ... instead of a contiguous slice",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(MHA, NoOutProj, "heads", ["head-split-equivalence", "oracle-float64"], "out_proj is built but never applied"),
    _bug(MHA, OutProjNoBias, "heads", ["qkv-bias"],
         "out_proj = nn.Linear(d_out, d_out, bias=False): the seed's has a bias"),
    # projections
    _bug(SA, KeyValueSwapped, "projections", ["oracle-float64"], "keys from W_value, values from W_key",
         also=["scaling-sqrt-head-dim"]),
    _bug(MHA, QueryKeySwapped, "projections", ["oracle-float64"], "queries from W_key, keys from W_query",
         also=["scaling-sqrt-head-dim", "head-split-equivalence"]),
    _bug(CA, ValueWeightForKeys, "projections", ["oracle-float64"], "W_value reused for the keys",
         also=["scaling-sqrt-head-dim"]),
    _bug(CA, BiasAlwaysOn, "projections", ["qkv-bias"], "always builds the projections with a bias"),
    _bug(MHA, BiasIgnored, "projections", ["qkv-bias"], "drops qkv_bias: never a bias"),
    _bug(SA, V1TransposedWeights, "projections", ["output-contract"],
         "SelfAttention_v1 multiplies by W.T: crashes when d_in != d_out, wrong otherwise",
         also=["oracle-float64", "finite-output", "eval-deterministic", "permutation-equivariance",
               "weights-rows-sum-to-one", "scaling-sqrt-head-dim", "weight-transfer"]),
    _bug(CA, HiddenValueBias, "projections", ["oracle-float64"],
         "adds its own value bias, a parameter outside W_value, whatever qkv_bias says"),
    _bug(CA, ValueBiasTwice, "projections", ["oracle-float64"],
         "adds W_value's bias a second time: only shows with qkv_bias=True"),
    _bug(SA, CachedQK, "projections", ["weight-transfer"],
         "caches W_query W_key^T at construction: right until the weights are loaded or transferred"),
    # the wrapper
    _bug(WR, CatWrongDim, "wrapper", ["wrapper-concatenation"],
         "concatenates the heads along the tokens, then reshapes to the output width",
         also=["causal-perturbation", "prefix-consistency", "gradient-causality", "oracle-float64"]),
    _bug(WR, SharedHead, "wrapper", ["heads-independent"], "[head] * num_heads: one module, shared"),
    _bug(WR, CopiedHeads, "wrapper", ["heads-independent"], "deep copies of one head: identical weights"),
    _bug(WR, HeadsReversed, "wrapper", ["wrapper-concatenation", "oracle-float64"],
         "concatenates the heads in reverse order",
         also=["scaling-sqrt-head-dim"]),
    _bug(WR, OneHeadShort, "wrapper", ["output-contract"],
         "builds num_heads - 1 heads (at least one): only shows with num_heads > 1",
         also=["wrapper-concatenation", "finite-output", "eval-deterministic", "causal-perturbation"]),
    # batch handling
    _bug(MHA, MergeMixesBatch, "batch", ["batch-independence"],
         "merges with view(T, b, d_out).transpose(0, 1): mixes batch elements and tokens",
         also=["causal-perturbation", "prefix-consistency", "gradient-causality", "dropout-unbiased",
               "head-split-equivalence", "oracle-float64"]),
    _bug(CA, FirstElementOnly, "batch", ["batch-independence", "oracle-float64"],
         "attends over x[0] only and broadcasts it to the batch",
         also=["dropout-unbiased"]),
    _bug(CA, ScoresNormalizedOverBatch, "batch", ["batch-independence"],
         "centres the scores by their mean over the batch",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(TB, LayerNormOverBatch, "batch", ["batch-independence", "layernorm-pre-sublayer"],
         "LayerNorm statistics over (batch, features), BatchNorm-like",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(CA, SqueezedOutput, "batch", ["output-contract"], ".squeeze() on the output: drops a batch of 1"),
    # numerics
    _bug(SA, Float32Output, "numerics", ["output-contract"], "returns float32 for a float64 input"),
    _bug(CA, HalfPrecisionScores, "numerics", ["finite-output", "oracle-float64"],
         "computes the scores in float16: overflow at large inputs, error at any",
         also=["scaling-sqrt-head-dim"]),
    _bug(MHA, SoftmaxDenominatorEps, "numerics", ["weights-rows-sum-to-one"],
         "renormalizes with sum + 1e-6: rows sum to 1/(1+1e-6), visible in float64",
         also=["masked-softmax-renormalized", "head-split-equivalence", "oracle-float64"]),
    # the block's structure
    _bug(TB, PostLN, "structure", ["layernorm-pre-sublayer", "block-residual-identity"],
         "post-LN: normalizes after the residual add",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(TB, NoAttentionResidual, "structure", ["block-residual-identity", "oracle-float64"],
         "no shortcut around the attention sub-layer",
         also=["layernorm-pre-sublayer"]),
    _bug(TB, NoFeedForwardResidual, "structure", ["block-residual-identity", "oracle-float64"],
         "no shortcut around the feed-forward sub-layer"),
    _bug(TB, ResidualDropped, "dropout", ["block-residual-identity"],
         "drop(x + att(LN(x))): train-mode dropout hits the residual stream (unbiased, eval exact)"),
    _bug(TB, LayerNormUnbiased, "structure", ["layernorm-pre-sublayer", "finite-output", "oracle-float64"],
         "LayerNorm with the unbiased variance (NaN at emb_dim=1)",
         also=["gradient-causality", "weights-rows-sum-to-one", "weights-future-zero", "masked-softmax-renormalized",
               "scaling-sqrt-head-dim"]),
    _bug(TB, LayerNormEps1e6, "structure", ["layernorm-pre-sublayer"], "LayerNorm eps 1e-6: shows at small inputs",
         also=["scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(TB, LayerNormNoEps, "structure", ["layernorm-pre-sublayer", "finite-output"],
         "LayerNorm without eps: NaN for a constant token",
         also=["gradient-causality", "weights-rows-sum-to-one", "weights-future-zero", "masked-softmax-renormalized",
               "scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(TB, LayerNormScaleShiftSwapped, "structure", ["layernorm-pre-sublayer", "oracle-float64"],
         "shift * norm + scale",
         also=["scaling-sqrt-head-dim"]),
    _bug(TB, LayerNormOverTokens, "structure", ["prefix-consistency", "layernorm-pre-sublayer"],
         "LayerNorm over dim=1, the tokens: the statistics leak the future",
         also=["causal-perturbation", "gradient-causality", "scaling-sqrt-head-dim", "oracle-float64"]),
    _bug(TB, SharedNorm, "structure", ["layernorm-pre-sublayer"],
         "norm1 before both sub-layers: invisible while the norms have their initial scale 1 and shift 0"),
    _bug(TB, GELUErf, "structure", ["feedforward-gelu-tanh", "oracle-float64"],
         "nn.GELU() (exact erf) instead of GPT-2's tanh approximation"),
    _bug(TB, ReLUFeedForward, "structure", ["feedforward-gelu-tanh", "oracle-float64"], "ReLU instead of GELU"),
    _bug(TB, FeedForward2x, "structure", ["feedforward-gelu-tanh"], "hidden width 2 * emb_dim instead of 4 * emb_dim"),
    _bug(TB, BranchDropoutNotRescaled, "structure", ["block-branch-dropout-inverted"],
         "the branch dropout keeps with probability 1-p, not scaled by 1/(1-p): biased in train mode"),
    _bug(TB, FeedForwardNeverDropped, "structure", ["block-branch-dropout-inverted"],
         "the feed-forward residual branch never dropped in train mode (only the attention branch is)"),
    _bug(TB, ResidualDropoutInEval, "structure", ["eval-deterministic"],
         "shortcut dropout with training=True: drops in eval mode",
         also=["oracle-float64", "prefix-consistency", "batch-independence", "layernorm-pre-sublayer"]),
    # input and state mutation
    _bug(TB, InPlaceResidual, "mutation", ["input-not-mutated", "eval-deterministic"],
         "x += att(norm1(x)): the output is right, the caller's input is overwritten",
         also=["train-p0-equals-eval", "gradient-causality", "batch-independence", "scaling-sqrt-head-dim",
               "dropout-on-weights", "weight-transfer", "layernorm-pre-sublayer"]),
    _bug(CA, QueryScaledInPlace, "mutation", ["input-not-mutated"], "folds 1/sqrt(d) into the input with x.mul_",
         also=["eval-deterministic", "train-p0-equals-eval", "gradient-causality", "batch-independence",
               "scaling-sqrt-head-dim", "dropout-on-weights", "dropout-unbiased", "oracle-float64", "weight-transfer"]),
    _bug(MHA, MaskBufferEdited, "mutation", ["state-unchanged"],
         "turns the mask buffer into an additive -inf mask in place: outputs stay right"),
    _bug(SA, SelfAttentionNormalizesInput, "mutation", ["input-not-mutated", "oracle-float64"],
         "x /= ||x||: an in-place input normalization"),
    # gradients
    _bug(MHA, DetachedKeys, "gradients", ["gradient-oracle", "gradient-reaches-parameters"],
         "keys .detach()ed: W_key never learns", also=["gradient-finite-differences"]),
    _bug(CA, DetachedValues, "gradients", ["gradient-oracle", "gradient-finite-differences"],
         "values .detach()ed: W_value never learns"),
    _bug(CA, ScoresUnderNoGrad, "gradients", ["gradient-oracle", "gradient-reaches-parameters"],
         "the scores computed under torch.no_grad()"),
    _bug(MHA, FrozenValueWeight, "gradients", ["gradient-reaches-parameters", "gradient-oracle"],
         "W_value.weight created with requires_grad=False"),
    _bug(MHA, CustomSoftmaxWrongBackward, "gradients", ["gradient-oracle", "gradient-finite-differences"],
         "a custom autograd.Function softmax whose backward forgets the -y*sum(g*y) term"),
    _bug(CA, QueryWeightData, "gradients", ["gradient-reaches-parameters", "gradient-oracle"],
         "F.linear(x, W_query.weight.data): the query weight gets no gradient"),
    _bug(MHA, FusedQKVDetachedValues, "gradients", ["gradient-finite-differences"],
         "fused c_attn (projections not found), values detached: c_attn still gets a gradient"),
    # call history
    _bug(MHA, ShapeCachedKV, "history", ["history-independent"],
         "K/V cached by input shape: a later input of the same shape gets the first one's keys and values"),
    _bug(CA, MaskFromFirstCall, "history", ["history-independent"],
         "additive mask built at the first call's length: after a 1-token call, nothing is masked"),
    _bug(CA, TrainMaskReusedInEval, "history", ["history-independent"],
         "the last train-mode dropout mask is reapplied in eval mode"),
    _bug(SA, LazyFusedQK, "history", ["parameter-update-respected"],
         "W_query W_key^T fused at the first call, stale after load_state_dict or an optimizer step"),
    _bug(MHA, FusedQKVWatchesQueryOnly, "history", ["history-independent"],
         "inference fuses q/k/v weights, rebuilt only when W_query changes: a W_key/W_value-only update is ignored"),
    _bug(CA, ReseededDropout, "history", ["train-masks-vary"],
         "dropout generator reseeded to 0 inside forward: every call drops the same positions"),
    _bug(CA, PrivateGeneratorDropout, "history", ["train-masks-vary"],
         "dropout masks from a private torch.Generator seeded once: torch.manual_seed does not reproduce them"),
    _bug(MHA, IgnoresDropout, "history", ["train-differs-from-eval", "train-masks-vary"],
         "the dropout module is built but never applied"),
    _bug(MHA, SDPANoDropout, "history", ["train-differs-from-eval"],
         "scaled_dot_product_attention with dropout_p=0 in train mode"),
    # dropout applied twice, masks shared
    _bug(MHA, DoubleDropout, "dropout", ["dropout-output-from-applied-weights"],
         "dropout on the weights and again on the context before out_proj"),
    _bug(MHA, DropoutMaskSharedAcrossHeads, "dropout", ["dropout-masks-independent"],
         "one dropout mask per batch element, shared by all heads"),
    _bug(MHA, DropoutMaskSharedAcrossBatchMHA, "dropout", ["dropout-masks-independent"],
         "one dropout mask per head, shared by all batch elements"),
    _bug(MHA, QueryChunksMaskNotShifted, "size", ["oracle-float64"],
         "past 256 tokens, query chunks of 256 get the first chunk's causal mask (not shifted to their position)"),
    _bug(MHA, FusedSoftmaxDropoutBackwardUnscaled, "gradients", ["gradient-finite-differences"],
         "a fused softmax-dropout autograd.Function whose backward forgets 1/(1-p): score gradients too small"),
    _bug(MHA, HandWrittenBackwardNoScale, "gradients", ["gradient-oracle", "gradient-finite-differences"],
         "a hand-written attention autograd.Function whose backward forgets 1/sqrt(head_dim) in dQ, dK"),
    _bug(CA, GenerationCacheKeptInTrain, "history", ["history-independent"],
         "K/V cached in eval mode (generation) and reused in train mode for inputs of that shape"),
]


# --- issue 10: fused kernels, fused projections, real deviations in float64 and float32 -----------


class EpsOutsideSqrtNorm(LayerNorm):
    def forward(self, x):
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - x.mean(dim=-1, keepdim=True)) / (torch.sqrt(var) + self.eps) + self.shift


class LayerNormEpsOutsideSqrt(_BlockWithNorm):
    norm_cls = EpsOutsideSqrtNorm


class _Flash(MHASteps):
    """The impl MHA around F.scaled_dot_product_attention; ``sdpa_kwargs`` is the one line a bug changes."""

    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        ctx = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs(T))
        return self.out(self.merge(ctx, b, T))

    def sdpa_kwargs(self, T):
        return dict(is_causal=True, dropout_p=self.dropout.p if self.training else 0.0)


class FlashNoTrainDropout(_Flash):
    def sdpa_kwargs(self, T):
        return dict(is_causal=True, dropout_p=0.0)  # never asks the kernel for attention dropout


class FlashDropoutInEval(_Flash):
    def sdpa_kwargs(self, T):
        return dict(is_causal=True, dropout_p=self.dropout.p)  # the kernel drops in eval mode too


class FlashNotCausal(_Flash):
    def sdpa_kwargs(self, T):
        return dict(is_causal=False, dropout_p=self.dropout.p if self.training else 0.0)


class FlashScaleByDOut(_Flash):
    def sdpa_kwargs(self, T):
        return dict(is_causal=True, scale=self.d_out**-0.5, dropout_p=self.dropout.p if self.training else 0.0)


class FlashBoolMaskInverted(_Flash):
    def sdpa_kwargs(self, T):  # SDPA's bool mask is True where attended: this one is True on the future
        return dict(attn_mask=self.mask.bool()[:T, :T], dropout_p=self.dropout.p if self.training else 0.0)


class FlashTrilBufferAsAdditiveMask(_Flash):
    def sdpa_kwargs(self, T):  # nanoGPT's float tril(ones) buffer passed as is: an additive mask of 0/1
        return dict(attn_mask=(1 - self.mask[:T, :T]).to(self.W_query.weight.dtype),
                    dropout_p=self.dropout.p if self.training else 0.0)


class FlashNoTranspose(_Flash):
    """Forgets .transpose(1, 2): SDPA sees (B, T, H, hd) and attends over the heads, causally."""

    def split(self, t, b, T):
        return t.view(b, T, self.num_heads, self.head_dim)

    def merge(self, ctx, b, T):
        return ctx.reshape(b, T, self.d_out)


class FlashMaskIncludesDiagonal(_Flash):
    def sdpa_kwargs(self, T):  # triu(-inf, diagonal=0): the diagonal is masked too, row 0 entirely
        mask = torch.triu(torch.full((T, T), float("-inf")), 0).to(self.W_query.weight.dtype)
        return dict(attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)


class FusedQKVSwapped(nn.Module):
    """nanoGPT layout (fused c_attn, c_proj), but the split is read as k, q, v."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.c_proj = nn.Linear(d_out, d_out)
        self.n_head, self.n_embd, self.p = num_heads, d_out, dropout

    def forward(self, x):
        B, T, _ = x.shape
        k, q, v = self.c_attn(x).split(self.n_embd, dim=2)  # bug: c_attn's rows are [q | k | v]
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_embd))


class FusedQKVScaleByDIn(FusedQKVSwapped):
    """nanoGPT's eager path with the scores divided by sqrt(d_in) instead of sqrt(head_dim)."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(self.n_embd, dim=2))
        att = (q @ k.transpose(-2, -1)) / C**0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((F.dropout(att, self.p, self.training) @ v).transpose(1, 2).reshape(B, T, self.n_embd))


CORPUS += [
    _bug(TB, LayerNormEpsOutsideSqrt, "structure", ["layernorm-pre-sublayer"],
         "LayerNorm (x - mean) / (sqrt(var) + eps): eps outside the square root"),
    _bug(MHA, FlashNoTrainDropout, "dropout", ["dropout-on-weights"],
         "F.scaled_dot_product_attention(dropout_p=0) in train mode: no attention dropout"),
    _bug(MHA, FlashDropoutInEval, "dropout", ["dropout-on-weights", "eval-deterministic"],
         "F.scaled_dot_product_attention(dropout_p=p) in eval mode too"),
    _bug(MHA, FlashNotCausal, "masking", ["weights-future-zero", "causal-perturbation"],
         "F.scaled_dot_product_attention(is_causal=False) and no mask",
         also=["masked-softmax-renormalized", "oracle-float64"]),
    _bug(MHA, FlashScaleByDOut, "scaling", ["scaling-sqrt-head-dim"],
         "F.scaled_dot_product_attention(scale=d_out**-0.5) instead of the default 1/sqrt(head_dim)",
         also=["oracle-float64"]),
    _bug(MHA, FlashBoolMaskInverted, "masking", ["weights-future-zero"],
         "a bool attn_mask True on the future (SDPA's True means attended)",
         also=["causal-perturbation"]),
    _bug(MHA, FlashTrilBufferAsAdditiveMask, "masking", ["weights-future-zero"],
         "a 0/1 float mask passed as attn_mask: added to the scores, masks nothing",
         also=["causal-perturbation"]),
    _bug(MHA, FlashNoTranspose, "heads", ["oracle-float64", "head-split-equivalence"],
         "SDPA on (B, T, H, hd): attends over the heads instead of the tokens", also=["scaling-sqrt-head-dim"]),
    _bug(MHA, FlashMaskIncludesDiagonal, "masking", ["weights-rows-sum-to-one", "oracle-float64"],
         "additive mask triu(-inf, diagonal=0): a query may not attend to itself; row 0 is empty",
         also=["weights-future-zero", "masked-softmax-renormalized", "scaling-sqrt-head-dim"]),
    _bug(MHA, FusedQKVSwapped, "projections", ["scaling-sqrt-head-dim", "oracle-float64"],
         "fused c_attn split as k, q, v: the layout says q, k, v"),
    _bug(MHA, FusedQKVScaleByDIn, "scaling", ["scaling-sqrt-head-dim"],
         "fused c_attn, scores divided by sqrt(d_in) instead of sqrt(head_dim)", also=["oracle-float64"]),

    # size-dependent bugs (issue 9)
    _bug(MHA, OnlineSoftmaxNoRescale, "size", ["oracle-float64"],
         "online softmax over key blocks of 16: the denominator is not rescaled when a later block raises the max"),
    _bug(MHA, OnlineSoftmaxBlock32MaskOffByOne, "size", ["causal-perturbation"],
         "online softmax over key blocks of 32: query rows 32..63 see one future key"),
    _bug(MHA, MaskBufferCapped16, "size", ["causal-perturbation"],
         "mask buffer capped at 16 rows; longer sequences pad it with False, so tokens past 16 see the future"),
    _bug(MHA, SlidingWindow8, "size", ["oracle-float64"], "an unrequested sliding window of 8 keys"),
    _bug(MHA, FastPathDropoutInEval, "size", ["eval-deterministic"],
         "a fused fast path for head_dim >= 8 that applies dropout in eval mode"),
    _bug(CA, MicroBatchWrongIndex, "size", ["oracle-float64"],
         "micro-batches of 4 read x[step:], not x[start:]: wrong from batch element 5 on"),
    # inputs and dtypes (issue 9)
    _bug(TB, LayerNormOnePassVariance, "inputs", ["layernorm-pre-sublayer"],
         "LayerNorm variance E[x^2] - E[x]^2: catastrophic cancellation on off-centre input"),
    _bug(MHA, MaskFillMinus1e4, "inputs", ["causal-perturbation"],
         "masked_fill(-1e4): the future leaks once scores reach ~1e4"),
    _bug(MHA, Float16MaskNaN, "inputs", ["output-contract"],
         "additive mask 0/1 times -1e9 cast to the dtype: -inf in float16, and 0 * -inf = NaN"),
    _bug(MHA, HalfPrecisionSoftmax, "inputs", ["weights-rows-sum-to-one"],
         "softmax in float16 for float32 input"),
    _bug(MHA, BlockLocalMaxSoftmax, "size", ["finite-output"],
         "softmax stabilized by the max of the first 32 keys only: overflows past 32 tokens at large scores"),
    _bug(MHA, KeyChunksDropTail, "size", ["oracle-float64"],
         "keys in chunks of 16 with the partial last chunk dropped: the last T % 16 keys are never attended"),
]


# --- modern attention (issue 13): grouped-query K/V heads, rotary embeddings, sliding window ------


class GQASteps(_Steps, GroupedQueryAttention):
    """The impl's GroupedQueryAttention in steps: project, split (num_heads query heads, num_kv_heads K/V
    heads), rope(q), rope(k), repeat K/V per group, then the _Steps attention (its mask buffer has the window)."""

    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = self.project(x)
        q, k, v = self.split(q, b, T, self.num_heads), self.split(k, b, T, self.num_kv_heads), self.split(v, b, T, self.num_kv_heads)
        if self.cos is not None:
            q, k = self.rope(q, T), self.rope_keys(k, T)
        k, v = self.repeat(k), self.repeat(v)
        w = self.normalize(self.mask_scores(self.scores(q, k), T), k.shape[-1])
        return self.out(self.merge(self.drop(w) @ v, b, T))

    def split(self, t, b, T, heads):
        return t.view(b, T, heads, self.head_dim).transpose(1, 2)

    def rope(self, t, T):
        return rotate(t, self.cos[:T].to(t.dtype), self.sin[:T].to(t.dtype), self.rope_interleaved)

    def rope_keys(self, t, T):
        return self.rope(t, T)

    def repeat(self, t):
        return t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def merge(self, ctx, b, T):
        return ctx.transpose(1, 2).contiguous().view(b, T, self.d_out)

    def out(self, ctx):
        return self.out_proj(ctx)


class KVHeadsTiled(GQASteps):
    def repeat(self, t):
        return t.repeat(1, self.num_heads // self.num_kv_heads, 1, 1)  # head h gets K/V head h % G, not h // group


class RopeQueriesOnly(GQASteps):
    def rope_keys(self, t, T):
        return t  # the keys are not rotated: scores depend on the query's absolute position


class RopeKeysShifted(GQASteps):
    def rope_keys(self, t, T):
        if self.cos.shape[0] < 2:
            return self.rope(t, T)
        one = (self.cos[1:2].to(t.dtype), self.sin[1:2].to(t.dtype))  # R_{p+1} = R_1 R_p
        return rotate(self.rope(t, T), *one, self.rope_interleaved)  # keys one position ahead (an offset off by one)


class RopeLayoutIgnored(GQASteps):
    def rope(self, t, T):
        return rotate(t, self.cos[:T].to(t.dtype), self.sin[:T].to(t.dtype), False)  # always half-split


class RopeBaseIgnored(GQASteps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cos is not None:  # the table built with base 10000 whatever rope_base says
            r = 2 * self.cos.shape[-1]
            angles = torch.arange(self.context_length, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
            self.cos, self.sin = angles.cos(), angles.sin()


class RopeRotatesWholeHead(GQASteps):
    def rope(self, t, T):
        r = 2 * self.cos.shape[-1]  # partial rotary: the pairs (i, i + r/2) taken over the whole head instead
        half = self.head_dim // 2
        cos = torch.cat([self.cos[:T], torch.ones(T, half - r // 2, dtype=self.cos.dtype)], -1).to(t.dtype)
        sin = torch.cat([self.sin[:T], torch.zeros(T, half - r // 2, dtype=self.sin.dtype)], -1).to(t.dtype)
        return rotate(t, cos, sin, self.rope_interleaved)


class RopeNegatedAngle(GQASteps):
    def rope(self, t, T):
        return rotate(t, self.cos[:T].to(t.dtype), -self.sin[:T].to(t.dtype), self.rope_interleaved)  # rotate_half sign flipped


class WindowOffByOne(GQASteps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        window, C = kwargs.get("window"), self.context_length
        if window is not None:  # i - w <= j: w + 1 keys
            self.mask = torch.triu(torch.ones(C, C), diagonal=1) + torch.tril(torch.ones(C, C), diagonal=-window - 1)


class WindowIgnored(GQASteps):
    def mask_scores(self, s, T):
        return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)  # causal only


class SDPAGQANoEnable(GroupedQueryAttention):
    """F.scaled_dot_product_attention with K/V heads expanded by .expand().reshape() on the wrong axis."""

    def forward(self, x):
        b, T, _ = x.shape
        q = self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.cos is not None:
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
            q, k = rotate(q, cos, sin, self.rope_interleaved), rotate(k, cos, sin, self.rope_interleaved)
        group = self.num_heads // self.num_kv_heads
        k, v = (t[:, None].expand(b, group, self.num_kv_heads, T, self.head_dim).reshape(b, self.num_heads, T, self.head_dim)
                for t in (k, v))  # [None] before the K/V axis: tiled, head h gets K/V head h % G
        mask = ~self.mask.bool()[:T, :T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, T, self.d_out))


GQA = "gqa"
CORPUS += [
    _bug(GQA, KVHeadsTiled, "grouped query", ["grouped-query-kv-shared"],
         "K/V heads repeated with repeat (tiled: head h uses K/V head h % G) instead of repeat_interleave",
         also=["oracle-float64"]),
    _bug(GQA, SDPAGQANoEnable, "grouped query", ["grouped-query-kv-shared"],
         "SDPA with K/V expanded on a new axis before the K/V heads: tiled, not grouped",
         also=["oracle-float64", "scaling-sqrt-head-dim"]),
    _bug(GQA, RopeQueriesOnly, "rotary", ["rotary-relative-position"],
         "RoPE on the queries only: scores depend on absolute positions", also=["rotary-embedding", "oracle-float64"]),
    _bug(GQA, RopeKeysShifted, "rotary", ["rotary-embedding"],
         "keys rotated one position ahead of the queries (a position offset off by one)",
         also=["oracle-float64"]),
    _bug(GQA, RopeLayoutIgnored, "rotary", ["rotary-embedding"],
         "rope_interleaved ignored: half-split pairs (rotate_half) where interleaved pairs were asked for"),
    _bug(GQA, RopeBaseIgnored, "rotary", ["rotary-embedding"], "the angle table built with base 10000, not rope_base"),
    _bug(GQA, RopeRotatesWholeHead, "rotary", ["gradient-oracle", "kv-cache-decoding"],
         "partial rotary with the pairs (i, i + head_dim/2) of the whole head: the wrong halves rotated"),
    _bug(GQA, RopeNegatedAngle, "rotary", ["rotary-embedding"], "rotate_half with its sign flipped: angles negated",
         also=["oracle-float64"]),
    _bug(GQA, WindowOffByOne, "window", ["sliding-window", "sliding-window-weights"],
         "sliding window i - w <= j: one key too many", also=["oracle-float64"]),
    _bug(GQA, WindowIgnored, "window", ["sliding-window-weights"], "the window is ignored: causal only",
         also=["sliding-window", "oracle-float64"]),
]


# --- the KV cache (issue 13) ----------------------------------------------------------------------


class CacheAppendedTwice(GroupedQueryAttention):
    def forward(self, x, use_cache=False):
        out = super().forward(x, use_cache)
        if use_cache:  # the new keys and values appended a second time
            T = x.shape[1]
            self.cache_k = torch.cat([self.cache_k, self.cache_k[:, :, -T:]], dim=2)
            self.cache_v = torch.cat([self.cache_v, self.cache_v[:, :, -T:]], dim=2)
        return out


class CachePositionNotAdvanced(GroupedQueryAttention):
    def rope(self, t, start):
        return super().rope(t, 0)  # every new piece rotated as if it started at position 0


class RopeTableFirstDtype(GroupedQueryAttention):
    """The rotary table cached at the first call in that call's dtype and reused for every dtype (Hugging
    Face's former cos/sin cache): after a first call in bfloat16, float32 calls rotate by rounded angles."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._exact = None if self.cos is None else (self.cos.clone(), self.sin.clone())  # plain: .to() skips them
        self._table = None

    def rope(self, t, start):
        if self._exact is None:
            return t
        if self._table is None:  # built at the first call, in that call's dtype, and kept
            self._table = tuple(a.to(t.dtype) for a in self._exact)
        cos, sin = self._table
        end = start + t.shape[2]
        return rotate(t, cos[start:end].to(t.dtype), sin[start:end].to(t.dtype), self.rope_interleaved)


class RopePositionsInInputDtype(GroupedQueryAttention):
    """Found by red-team pass 5: frequencies and angles in float32, but the positions made as arange(..., dtype=x.dtype):
    in bfloat16 positions past 256 round (257 -> 256), so the rotation no longer depends on i - j alone."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False,
                 rope_base=None, rope_fraction=1.0, rope_interleaved=False, window=None):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, num_kv_heads, qkv_bias, rope_base,
                         rope_fraction, rope_interleaved, window)
        if self.cos is not None:
            r = 2 * self.cos.shape[-1]
            self.inverse = rope_base ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)

    def rope(self, t, start):
        if self.cos is None:
            return t
        positions = torch.arange(start, start + t.shape[2], dtype=t.dtype, device=t.device).float()  # rounded in bf16
        angles = positions[:, None] * self.inverse.to(t.device)
        return rotate(t, angles.cos().to(t.dtype), angles.sin().to(t.dtype), self.rope_interleaved)


class ForwardWritesCache(GroupedQueryAttention):
    """A plain forward(x) (use_cache=False) computes right but leaves x's keys and values in the cache."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if not use_cache:
            self.reset_cache()
        return super().forward(x, use_cache=True, attention_mask=attention_mask)


class ForwardReadsCache(GroupedQueryAttention):
    """A plain forward(x) (use_cache=False) also attends over what the cache holds, without storing x."""

    def forward(self, x, use_cache=False):
        if use_cache or self.cache_k is None:
            return super().forward(x, use_cache=use_cache)
        saved = (self.cache_k, self.cache_v)
        out = super().forward(x, use_cache=True)
        self.cache_k, self.cache_v = saved
        return out


class CacheResetKeepsPosition(GroupedQueryAttention):
    """Counts positions itself (llms-from-scratch's ptr_current_pos) and forgets to zero it in reset_cache()."""

    def reset_cache(self):
        self.cache_k = self.cache_v = None

    def cached_tokens(self):
        return getattr(self, "position", 0)

    def forward(self, x, use_cache=False):
        out = super().forward(x, use_cache)
        if use_cache:
            self.position = self.cached_tokens() + x.shape[1]
        return out


CORPUS += [
    _bug(GQA, CacheAppendedTwice, "kv cache", ["kv-cache-decoding"], "the cache gets each new key and value twice"),
    _bug(GQA, CachePositionNotAdvanced, "kv cache", ["kv-cache-decoding"],
         "RoPE of a decoded piece at position 0, not after the cached tokens"),
    _bug(GQA, ForwardReadsCache, "kv cache", ["kv-cache-decoding"], "forward without use_cache reads the cache"),
    _bug(GQA, ForwardWritesCache, "kv cache", ["kv-cache-decoding"], "forward without use_cache writes the cache"),
    _bug(GQA, RopeTableFirstDtype, "history", ["history-independent"],
         "the rotary table is kept in the dtype of the first call (bfloat16 rounding in later float32 calls)"),
    _bug(GQA, CacheResetKeepsPosition, "kv cache", ["kv-cache-decoding"],
         "reset_cache() empties the cache but keeps the position counter"),
]


# --- a fast path taken only without autograd (inference) ---------------------------------------------


class _NoGradFastPath(MultiHeadAttention):
    """A fused inference path, taken in eval mode under torch.no_grad() (as PyTorch's own
    nn.MultiheadAttention does); training and grad-enabled eval take the seed's path. A subclass's
    ``sdpa_kwargs`` is the one mistake of its fused path."""

    sdpa_kwargs = dict(is_causal=True)

    def forward(self, x):
        if self.training or torch.is_grad_enabled():
            return super().forward(x)
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class NoGradFastPathNotCausal(_NoGradFastPath):
    sdpa_kwargs = dict()  # is_causal missing


class NoGradFastPathUnscaled(_NoGradFastPath):
    sdpa_kwargs = dict(is_causal=True, scale=1.0)  # scores not divided by sqrt(head_dim)


class CheckpointWithoutRNGState(MultiHeadAttention):
    """Activation checkpointing in training with preserve_rng_state=False: backward recomputes forward
    with another dropout mask, so the gradients are another forward's."""

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False,
                                                     preserve_rng_state=False)
        return super().forward(x)


class FusedPathWhenWideAndLong(MultiHeadAttention):
    """A flash-eligible path (head_dim a multiple of 8 and >= 32 tokens) calling SDPA without is_causal;
    narrow or short inputs take the seed's path."""

    def forward(self, x):
        b, t, _ = x.shape
        if self.head_dim % 8 or t < 32:
            return super().forward(x)
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class LearnedTemperatureMHA(MultiHeadAttention):
    """Found by red-team pass 6: a learned per-head score scale (a parameter initialised to 1, as in
    learned-temperature experiments): the specification at initialisation, not after a training step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_scale = nn.Parameter(torch.ones(self.num_heads))
        self.W_query.register_forward_hook(  # scaling head h's queries scales its scores
            lambda _, __, q: q * self.logit_scale.to(q.dtype).repeat_interleave(self.head_dim))


class ZeroInitRelativeBiasCausal(CausalAttention):
    """Found by red-team pass 6: a leftover learned relative-position bias (one scalar per offset i - j,
    T5/Shaw style), initialised to zero and added to the scores."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, qkv_bias)
        self.relative_bias = nn.Parameter(torch.zeros(context_length))

    def forward(self, x):
        t = x.shape[1]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        offsets = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).to(x.device)
        scores = queries @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5 + self.relative_bias.to(x.dtype)[offsets]
        scores = scores.masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        return self.dropout(torch.softmax(scores, dim=-1)) @ values


class MaskValueOfInputDtype(MultiHeadAttention):
    """Found by red-team pass 6: the mask fill value is torch.finfo of the input's dtype, not the scores': under
    torch.autocast the scores are bfloat16 or float16 and masked_fill raises (the value overflows them)."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3) / self.head_dim ** 0.5).masked_fill(self.mask.bool()[:t, :t],
                                                                            torch.finfo(x.dtype).min)
        context = self.dropout(torch.softmax(scores, dim=-1)) @ v
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class PathSwitchedWhenWarm(MultiHeadAttention):
    """An autotuner: the first 20 calls of a shape run the reference path (while candidates are timed); later calls
    of that shape take the 'fastest' candidate, an SDPA path that forgets the causal mask."""

    def forward(self, x):
        calls = self.__dict__.setdefault("_calls", {})
        calls[x.shape] = calls.get(x.shape, 0) + 1
        if calls[x.shape] <= 20:
            return super().forward(x)
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class HeadsInGroupsOfEight(MultiHeadAttention):
    """Found by red-team pass 7: heads processed in groups of 8 (a kernel's limit), ``num_heads // 8 or 1`` groups:
    past 8 heads the remainder (GPT-2's heads 8-11) outputs zeros."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        context = torch.zeros_like(q)
        for g in range(self.num_heads // 8 or 1):
            heads = slice(8 * g, 8 * g + 8)
            scores = (q[:, heads] @ k[:, heads].transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
            context[:, heads] = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1)) @ v[:, heads]
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class _LinearInputGradWithWeightGrad(torch.autograd.Function):
    """A fused linear whose backward computes the input's gradient inside the weight-gradient branch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            grad_x = g @ weight  # only when the weight needs a gradient
        if ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


class FrozenWeightsStopInputGrad(MHASteps):
    """Found by red-team pass 7: q/k/v through a fused linear whose backward gives the input a gradient only when the
    weight needs one: fine-tuning around frozen weights (LoRA) stops every earlier layer from learning."""

    def project(self, x):
        return tuple(_LinearInputGradWithWeightGrad.apply(x, w.weight, w.bias)
                     for w in (self.W_query, self.W_key, self.W_value))


class MaskMemoisedInInferenceMode(MultiHeadAttention):
    """Found by red-team pass 7: causal masks built lazily and memoised per length; a first call under
    torch.inference_mode() (a validation pass before training) stores an inference tensor, and the next training
    step raises "Inference tensors cannot be saved for backward"."""

    def forward(self, x):
        b, t, _ = x.shape
        masks = self.__dict__.setdefault("_masks", {})
        if t not in masks:
            masks[t] = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(masks[t], -torch.inf)
        context = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1)) @ v
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class InputFlattenedAsStrided(MultiHeadAttention):
    """Found by red-team pass 7: the input flattened with as_strided((b * t, d), (d, 1)), reading its memory as if
    contiguous: a transposed or sliced activation hands over other values."""

    def forward(self, x):
        b, t, d = x.shape
        return super().forward(x.as_strided((b * t, d), (d, 1)).view(b, t, d))


class CausalMaskFromPositionsInInputDtype(MultiHeadAttention):
    """Found by red-team pass 7: the causal mask compares positions made in x's dtype: in bfloat16, past 256
    tokens neighbouring positions round together and a query sees the key after it."""

    def forward(self, x):
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device).to(x.dtype)
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(positions[None, :] > positions[:, None], -torch.inf)
        context = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1)) @ v
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))


class InferenceModeMergeNoTranspose(MultiHeadAttention):
    """Found by red-team pass 6: a serving path taken only under torch.inference_mode() merges the heads
    with reshape(b, t, d_out) without transposing (b, H, t, hd) first, mixing tokens and heads."""

    def forward(self, x):
        if not torch.is_inference_mode_enabled():
            return super().forward(x)
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(context.reshape(b, t, self.d_out))


class DropoutOnlyWithGrad(MultiHeadAttention):
    """Dropout gated on autograd: none in train mode under torch.no_grad(), where Monte Carlo dropout
    samples train-mode forwards."""

    def forward(self, x):
        p = self.dropout.p
        if not torch.is_grad_enabled():
            self.dropout.p = 0.0
        try:
            return super().forward(x)
        finally:
            self.dropout.p = p


CORPUS += [
    _bug(MHA, CheckpointWithoutRNGState, "gradients", ["gradient-finite-differences"],
         "checkpointed without preserve_rng_state: backward recomputes with another dropout mask"),
    _bug(MHA, FusedPathWhenWideAndLong, "size", ["causal-perturbation"],
         "head_dim % 8 == 0 and >= 32 tokens: a fused path without the causal mask"),
    _bug(MHA, DropoutOnlyWithGrad, "inference path", ["dropout-on-weights"],
         "train mode under torch.no_grad() applies no dropout"),
    _bug(MHA, NoGradFastPathNotCausal, "inference path", ["causal-perturbation"],
         "eval under torch.no_grad() takes a fused path without the causal mask"),
    _bug(MHA, NoGradFastPathUnscaled, "inference path", ["oracle-float64"],
         "eval under torch.no_grad() takes a fused path with unscaled scores"),
    _bug(MHA, LearnedTemperatureMHA, "projections", ["weight-transfer"],
         "a learned per-head score scale initialised to 1: equal to the specification only before training"),
    _bug(CA, ZeroInitRelativeBiasCausal, "projections", ["weight-transfer"],
         "a learned relative-position score bias initialised to 0: equal to the specification only before training"),
    _bug(MHA, MaskValueOfInputDtype, "dtypes", ["autocast-mixed-precision"],
         "the mask value is finfo(x.dtype).min: under torch.autocast it overflows the half-precision scores"),
    _bug(MHA, PathSwitchedWhenWarm, "history", ["history-independent"],
         "after 20 calls of a shape an autotuned path without the causal mask takes over"),
    _bug(MHA, HeadsInGroupsOfEight, "size", ["oracle-float64"],
         "heads in groups of 8, num_heads // 8 or 1 of them: past 8 heads the remainder outputs zeros"),
    _bug(MHA, FrozenWeightsStopInputGrad, "gradients", ["gradient-oracle"],
         "a fused linear's backward gives the input a gradient only when the weight needs one (frozen weights)"),
    _bug(MHA, MaskMemoisedInInferenceMode, "history", ["gradient-finite-differences", "gradient-reaches-parameters"],
         "a mask memoised under torch.inference_mode() breaks the next training step"),
    _bug(MHA, InputFlattenedAsStrided, "inputs", ["eval-deterministic"],
         "the input read with as_strided as if contiguous: a non-contiguous input gives other values"),
    _bug(MHA, CausalMaskFromPositionsInInputDtype, "size", ["weights-future-zero"],
         "causal mask from positions in x's dtype: in bfloat16 past 256 tokens a query sees the next key"),
    _bug(MHA, InferenceModeMergeNoTranspose, "inference path", ["head-split-equivalence"],
         "under torch.inference_mode() a serving path merges the heads without transposing them back"),
]


# --- cropping the KV cache (issue 13): crop_cache(n) keeps the first n tokens -----------------------------


class CropKeepsLastTokens(GroupedQueryAttention):
    def crop_cache(self, n):
        if self.cache_k is not None:  # the last n tokens kept: the right length, the wrong keys and values
            self.cache_k, self.cache_v = self.cache_k[:, :, -n:], self.cache_v[:, :, -n:]


class CropKeepsPosition(CacheResetKeepsPosition):
    """Counts positions itself and resets the counter in reset_cache(), but not in crop_cache()."""

    def reset_cache(self):
        super().reset_cache()
        self.position = 0


class CropPastTheCachedTokens(GroupedQueryAttention):
    """Found by red-team pass 4 (a static cache's write pointer set to n): crop_cache(n) with fewer than n tokens
    cached fills the slots up to n with zeros, attended as tokens."""

    def crop_cache(self, n):
        if self.cache_k is not None and n > self.cache_k.shape[2]:
            pad = (0, 0, 0, n - self.cache_k.shape[2])
            self.cache_k, self.cache_v = F.pad(self.cache_k, pad), F.pad(self.cache_v, pad)
        else:
            super().crop_cache(n)


CORPUS += [
    _bug(GQA, CropPastTheCachedTokens, "kv cache", ["kv-cache-decoding"],
         "crop_cache(n) past the cached tokens takes the slots up to n as written (zeros)"),
    _bug(GQA, CropKeepsLastTokens, "kv cache", ["kv-cache-decoding"],
         "crop_cache(n) keeps the last n cached tokens, not the first n"),
    _bug(GQA, CropKeepsPosition, "kv cache", ["kv-cache-decoding"],
         "crop_cache(n) cuts the cache but leaves the position counter after the cropped tokens"),
]


# --- padding masks (issue 13): forward(x, attention_mask=m), m True at real tokens -----------------------


class PaddingIgnored(GroupedQueryAttention):
    def padded(self, attention_mask, start):
        return torch.zeros((), dtype=torch.bool, device=attention_mask.device)  # the mask is accepted, not applied


class PaddingMasksPaddedQueries(GroupedQueryAttention):
    """Found by red-team pass 6: every padded key masked for every query, padded queries included. With left
    padding a padded query then attends nothing: softmax 0/0 = NaN at an output nobody reads, and NaN in every
    gradient of a loss on the real tokens (training on a left-padded batch)."""

    def padded(self, attention_mask, start):
        return ~attention_mask.bool()[:, None, None, :]


class PaddingOnQueries(GroupedQueryAttention):
    def padded(self, attention_mask, start):
        return ~attention_mask.bool()[:, None, start:, None]  # padded query rows masked, padded keys attended


class PaddingDroppedWithCache(GroupedQueryAttention):
    def padded(self, attention_mask, start):
        if start:  # decoding after a prefill: the padding of the cached tokens forgotten
            return torch.zeros((), dtype=torch.bool, device=attention_mask.device)
        return super().padded(attention_mask, start)


class PaddingInverted(GroupedQueryAttention):
    def padded(self, attention_mask, start):
        return super().padded(~attention_mask.bool(), start)  # 1 read as padding, 0 as a real token


class PaddingLeftOffByOne(GroupedQueryAttention):
    def padded(self, attention_mask, start):
        real = attention_mask.bool()  # real from one position early: the last left pad is attended
        return super().padded(real | F.pad(real[:, 1:], (0, 1)), start)


class PaddingMaskKept(GroupedQueryAttention):
    def forward(self, x, use_cache=False, attention_mask=None):
        if attention_mask is not None:
            self.kept = attention_mask  # remembered "for the decoding steps", and applied to later unpadded calls
        elif getattr(self, "kept", None) is not None and self.kept.shape == x.shape[:2]:
            attention_mask = self.kept
        return super().forward(x, use_cache=use_cache, attention_mask=attention_mask)


class PaddingMemoisedByShape(GroupedQueryAttention):
    """Found by red-team pass 5: the padding mask memoised per shape (to build it once per layer and step), its
    contents not in the key: a later call of that shape with another mask gets the first one."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if attention_mask is not None:
            memo = self.__dict__.setdefault("_memo", {})
            attention_mask = memo.setdefault(tuple(attention_mask.shape), attention_mask)
        return super().forward(x, use_cache=use_cache, attention_mask=attention_mask)


CORPUS += [
    _bug(GQA, PaddingIgnored, "padding", ["padding-mask", "padding-weights"],
         "attention_mask accepted and ignored: real tokens attend the left padding"),
    _bug(GQA, PaddingOnQueries, "padding", ["padding-mask", "padding-weights"],
         "the padding mask applied to the queries (rows), not the keys: real tokens attend the left padding"),
    _bug(GQA, PaddingDroppedWithCache, "padding", ["padding-mask"],
         "the padding mask applied only while the cache is empty (generation from a padded batch)"),
    _bug(GQA, PaddingInverted, "padding", ["padding-mask", "padding-weights"],
         "the padding mask inverted: padded positions taken for real tokens and real ones for padding"),
    _bug(GQA, PaddingLeftOffByOne, "padding", ["padding-mask", "padding-weights"],
         "left padding off by one: the last padded position is attended"),
    _bug(GQA, PaddingMaskKept, "history", ["history-independent"],
         "the last padding mask kept and applied to later calls of that shape without one"),
    _bug(GQA, PaddingMasksPaddedQueries, "padding", ["padding-gradients"],
         "padded keys masked for padded queries too: NaN rows with left padding, NaN gradients when training"),
    _bug(GQA, PaddingMemoisedByShape, "history", ["padding-mask"],
         "the padding mask memoised by shape: a later call with another mask of that shape gets the first"),
]


# --- found by red-team passes 7 and 8 (eighth session) ------------------------------------------------------


class BlockOneResidualDropMask(TransformerBlock):
    """One residual dropout mask drawn per forward (one RNG call) and applied to both branches: each branch is
    dropped at the right rate and scaled right, but the two drops coincide."""

    def forward(self, x):
        p = self.drop_shortcut.p
        keep = (torch.rand_like(x) >= p).to(x.dtype) / (1 - p) if self.training and p > 0 else None
        drop = (lambda y: y * keep) if keep is not None else (lambda y: y)
        x = x + drop(self.att(self.norm1(x)))
        return x + drop(self.ff(self.norm2(x)))


CORPUS += [
    _bug(TB, BlockOneResidualDropMask, "dropout", ["block-branch-dropout-inverted"],
         "one residual dropout mask shared by the attention and feed-forward branches"),
]


class HeadDim256Unmasked(MHASteps):
    """A flash path up to head_dim 128; the hand-written fallback for bigger heads (Gemma's 256) forgets the causal
    mask."""

    def mask_scores(self, s, T):
        return super().mask_scores(s, T) if self.head_dim <= 128 else s


class MicroBatchTailForgotten(MHASteps):
    """Batches above 8 run in micro-batches of 8; the last batch % 8 rows are left at zero."""

    def forward(self, x):
        if x.shape[0] <= 8:
            return super().forward(x)
        out = x.new_zeros(*x.shape[:2], self.d_out)
        for i in range(x.shape[0] // 8):
            out[i * 8:(i + 1) * 8] = super().forward(x[i * 8:(i + 1) * 8])
        return out


class ManyHeadsFoldedWithoutTranspose(MHASteps):
    """Past 16 heads the heads are folded into the batch for a bmm kernel, with a reshape of the (b, t, h, d)
    projections that forgets to move the heads next to the batch first."""

    def split(self, t, b, T):
        return super().split(t, b, T) if self.num_heads <= 16 else t.reshape(b, self.num_heads, T, self.head_dim)


class LongSequenceCustomBackward(MHASteps):
    """From 256 tokens on (without dropout), a hand-written softmax whose backward is wrong (the one of
    CustomSoftmaxWrongBackward); its forward is exact."""

    def normalize(self, s, d_k):
        if s.shape[-1] >= 256 and not (self.training and self.dropout.p > 0):
            return _SoftmaxForgetsCentering.apply(s / d_k**0.5)
        return super().normalize(s, d_k)


class EvalKeysValuesNoGrad(MHASteps):
    """'eval means inference': keys and values projected under torch.no_grad() in eval mode, so gradients taken in
    eval mode (saliency maps, fine-tuning with model.eval()) miss W_key, W_value and x's path through them."""

    def project(self, x):
        if self.training:
            return super().project(x)
        with torch.no_grad():
            k, v = self.W_key(x), self.W_value(x)
        return self.W_query(x), k, v


class FusedWhenQueryFrozen(MHASteps):
    """When the projections look frozen (W_query checked alone), a fused, detached qkv weight is built once and
    reused: with only W_query frozen, W_key and W_value get no gradient."""

    def project(self, x):
        if self.W_query.weight.requires_grad:
            return super().project(x)
        if "_fused" not in self.__dict__:
            with torch.no_grad():
                layers = (self.W_query, self.W_key, self.W_value)
                self._fused = (torch.cat([m.weight for m in layers]).clone(),
                               torch.cat([m.bias for m in layers]).clone() if layers[0].bias is not None else None)
        w, b = self._fused
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)).chunk(3, dim=-1)


class FusedByVersionCounter(MHASteps):
    """The fused qkv weight is rebuilt when a parameter's version counter moves: updates through .data (an EMA,
    weight averaging) never move it."""

    def project(self, x):
        layers = (self.W_query, self.W_key, self.W_value)
        params = [m.weight for m in layers] + [m.bias for m in layers if m.bias is not None]
        key = (tuple((id(p), p._version, p.dtype) for p in params), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        if self.__dict__.get("_key") != key:
            self.__dict__["_fused"] = (torch.cat([m.weight for m in layers]),
                                       torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None)
            self.__dict__["_key"] = key
        return F.linear(x, *self.__dict__["_fused"]).chunk(3, dim=-1)


class PrefixCacheFirstEightTokens(MHASteps):
    """An inference prefix cache: keys and values of an earlier call reused when the first 8 tokens match; the
    later tokens are not in the key."""

    def project(self, x):
        if torch.is_grad_enabled():
            return super().project(x)
        key = (tuple(x[:, :8].double().flatten().tolist()), tuple(x.shape), x.dtype, self.training,
               tuple((id(p), p._version) for p in self.parameters()))
        cache = self.__dict__.setdefault("_prefix_cache", {})
        k, v = cache[key] if key in cache else (self.W_key(x), self.W_value(x))
        cache[key] = (k, v)
        return self.W_query(x), k, v


CORPUS += [
    _bug(MHA, HeadDim256Unmasked, "size", ["oracle-float64"],
         "past head_dim 128 a fallback path without the causal mask"),
    _bug(MHA, MicroBatchTailForgotten, "size", ["oracle-float64"],
         "micro-batches of 8: the last batch % 8 rows output zeros"),
    _bug(MHA, ManyHeadsFoldedWithoutTranspose, "size", ["oracle-float64"],
         "past 16 heads the heads are folded into the batch without a transpose"),
    _bug(MHA, LongSequenceCustomBackward, "gradients", ["gradient-oracle"],
         "from 256 tokens a custom backward that forgets softmax's -p sum(p dp) term"),
    _bug(MHA, EvalKeysValuesNoGrad, "gradients", ["gradient-oracle"],
         "keys and values projected under no_grad in eval mode: gradients in eval mode miss them"),
    _bug(MHA, FusedWhenQueryFrozen, "gradients", ["gradient-oracle"],
         "a detached fused qkv weight used whenever W_query is frozen: W_key/W_value get no gradient"),
    _bug(MHA, FusedByVersionCounter, "history", ["parameter-update-respected"],
         "fused qkv weight refreshed by version counter: updates through .data are ignored"),
    _bug(MHA, PrefixCacheFirstEightTokens, "history", ["history-independent"],
         "inference prefix cache keyed on the first 8 tokens: a later call sharing them gets stale keys/values"),
]


class PaddingKeptAfterReset(GroupedQueryAttention):
    """Keeps the prefill's padding mask for later decoding steps that pass none (generate()'s convenience);
    reset_cache() does not clear it, so the next sequence inherits the old padding."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if use_cache:
            if attention_mask is not None:
                self._pad = attention_mask.bool()
            elif getattr(self, "_pad", None) is not None:
                need = self.cached_tokens() + x.shape[1]
                kept = self._pad[:, :need]
                self._pad = attention_mask = torch.cat([kept, kept.new_ones(kept.shape[0], need - kept.shape[1])], 1)
        return super().forward(x, use_cache=use_cache, attention_mask=attention_mask)


CORPUS += [
    _bug(GQA, PaddingKeptAfterReset, "padding", ["padding-mask"],
         "a prefill's padding mask kept for decoding steps without one, not cleared by reset_cache()"),
]


class _SquaresInInputDtype(LayerNorm):
    """The variance as the mean of squared deviations, squared in the input's dtype."""

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class LayerNormSquaresInHalf(_BlockWithNorm):
    """A LayerNorm that squares the deviations in the input's dtype: in float16 a feature past 256 (an LLM's
    "massive activations") overflows the variance to inf, and that token is normalized to 0."""

    norm_cls = _SquaresInInputDtype


CORPUS += [
    _bug(TB, LayerNormSquaresInHalf, "inputs", ["layernorm-pre-sublayer"],
         "LayerNorm squares the deviations in float16: an outlier feature overflows the variance"),
]


class OutputBufferReused(MHASteps):
    """Found by red-team pass 7: without autograd the output projection is written into a buffer kept per shape (no
    allocation per decoding step, as a CUDA-graph replay does) and returned: the next call overwrites the tensor the
    last one returned."""

    def out(self, ctx):
        y = super().out(ctx)
        if torch.is_grad_enabled():
            return y
        key = (tuple(y.shape), y.dtype, y.device)
        if self.__dict__.get("_key") != key:
            self.__dict__.update(_buffer=torch.empty_like(y), _key=key)
        return self._buffer.copy_(y)


CORPUS += [
    _bug(MHA, OutputBufferReused, "history", ["eval-deterministic"],
         "without autograd the output is a buffer kept per shape: the next call overwrites the returned tensor"),
]


class HeadDimSlabsOf64(MHASteps):
    """Found by red-team pass 9: Q K^T summed over head_dim in slabs of 64 (a kernel's BLOCK_D loop); the remainder
    of a head_dim that is not a multiple of 64 (Phi-2's 80, Phi-3-mini's 96) is dropped."""

    def scores(self, q, k):
        return sum(q[..., c * 64:(c + 1) * 64] @ k[..., c * 64:(c + 1) * 64].transpose(-2, -1)
                   for c in range(max(1, q.shape[-1] // 64)))


class _LinearReadingGradAsContiguous(torch.autograd.Function):
    """F.linear whose backward reads the output's gradient with contiguous strides (a fused kernel handed its
    pointer without .contiguous())."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = torch.as_strided(g, g.shape, torch.empty(g.shape).stride(), g.storage_offset())
        flat = g.reshape(-1, g.shape[-1])
        return g @ w, flat.t() @ x.reshape(-1, x.shape[-1]), flat.sum(0)


class OutProjGradAsContiguous(MHASteps):
    """Found by red-team pass 9: a fused output projection whose backward assumes a contiguous gradient; a loss on a
    transposed output (cross_entropy(logits.transpose(1, 2), y)) hands it a strided one."""

    def out(self, ctx):
        return _LinearReadingGradAsContiguous.apply(ctx, self.out_proj.weight, self.out_proj.bias)


class PaddingSkippedWhenFirstRowReal(GroupedQueryAttention):
    """Found by red-team pass 9: Hugging Face-style "no padding, drop the mask" shortcut that tests the first row
    only: a batch whose first row is unpadded and another padded attends the padding."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if attention_mask is not None and bool(attention_mask[0].all()):
            attention_mask = None
        return super().forward(x, use_cache=use_cache, attention_mask=attention_mask)


CORPUS += [
    _bug(MHA, HeadDimSlabsOf64, "size", ["oracle-float64"],
         "Q K^T summed in head_dim slabs of 64: the rest of head_dim 80 or 96 is dropped"),
    _bug(MHA, OutProjGradAsContiguous, "gradients", ["gradient-oracle"],
         "a fused output projection's backward reads a strided output gradient as contiguous"),
    _bug(GQA, PaddingSkippedWhenFirstRowReal, "padding", ["padding-mask"],
         "the padding mask dropped when the first batch row is unpadded, another row padded"),
]


# -- found by red-team passes 7 and 9, caught since the landmark sizes (strategies.LANDMARKS) -----------------

class ScaleTableHeadDim128(MHASteps):
    """Red-team pass 7: softmax scales precomputed for the common head sizes; the entry for Llama's 128 holds
    1/sqrt(64)."""

    SCALES = {16: 16**-0.5, 32: 32**-0.5, 64: 64**-0.5, 128: 64**-0.5}

    def normalize(self, s, d_k):
        return torch.softmax(s * self.SCALES.get(d_k, d_k**-0.5), dim=-1)


class FoldedBmmWithoutTranspose(MHASteps):
    """Red-team pass 7: past 64 batch x heads a bmm path folds the heads into the batch, reshaping (b, T, d_out)
    to (b * heads, T, head_dim) without the transpose: tokens and heads mix."""

    def split(self, t, b, T):
        if b * self.num_heads <= 64:
            return super().split(t, b, T)
        return t.reshape(b, self.num_heads, T, self.head_dim)


class KeyChunksOf1024LocalMask(MHASteps):
    """Red-team pass 9: memory-efficient attention (Rabe & Staats) over key chunks of 1024 with an online softmax,
    each chunk's causal mask built from chunk-local key indices (the chunk's start forgotten)."""

    def forward(self, x):
        b, T = x.shape[0], x.shape[-2]
        q, k, v = (self.split(t, b, T) for t in self.project(x))
        rows = torch.arange(T)[:, None]
        top = torch.full(q.shape[:-1] + (1,), -torch.inf, dtype=q.dtype)
        total, acc = torch.zeros_like(top), torch.zeros_like(q)
        for start in range(0, T, 1024):
            s = q @ k[..., start:start + 1024, :].transpose(-2, -1) / self.head_dim**0.5
            s = s.masked_fill(torch.arange(s.shape[-1])[None, :] > rows, -torch.inf)  # (+ start forgotten)
            new_top = torch.maximum(top, s.amax(-1, keepdim=True))
            e, rescale = torch.exp(s - new_top), torch.exp(top - new_top)
            total, acc, top = total * rescale + e.sum(-1, keepdim=True), acc * rescale + self.drop(e) @ v[..., start:start + 1024, :], new_top
        return self.out(self.merge(acc / total, b, T))


class TileLocalMaskWhenWideAndLong(MHASteps):
    """Red-team pass 11: a tiled path (key tiles of 128) taken for head_dim >= 64 past 128 tokens masks each tile with
    the key's index inside the tile: from the second tile on, query i sees keys up to i + 128."""

    def mask_scores(self, s, T):
        if self.head_dim < 64 or T <= 128:
            return super().mask_scores(s, T)
        return s.masked_fill(torch.arange(T)[None, :] % 128 > torch.arange(T)[:, None], -torch.inf)


class LongContextPathHalfScale(MHASteps):
    """Written at the tenth session's review: a long-context path taken for head_dim >= 64 past 512 tokens scales the
    scores by 1/sqrt(head_dim / 2)."""

    def normalize(self, s, d_k):
        if d_k < 64 or s.shape[-1] <= 512:
            return super().normalize(s, d_k)
        return torch.softmax(s / (d_k / 2) ** 0.5, dim=-1)


class QueryChunksDropTheTail(MHASteps):
    """Red-team pass 11: past 2**22 scores (batch x heads x T x T) the queries go in chunks of 2**22 // (batch x heads x
    T); the loop covers T // chunk whole chunks and leaves the last T % chunk queries' weights at zero."""

    def normalize(self, s, d_k):
        w = super().normalize(s, d_k)
        if s.numel() <= 2**22:
            return w
        T = s.shape[-1]
        chunk = 2**22 // (s.numel() // T)
        return torch.cat([w[..., :T // chunk * chunk, :], torch.zeros_like(w[..., T // chunk * chunk:, :])], dim=-2)


CORPUS += [
    _bug(MHA, ScaleTableHeadDim128, "size", ["oracle-float64"], "the softmax scale for head_dim 128 is 1/sqrt(64)"),
    _bug(MHA, TileLocalMaskWhenWideAndLong, "size", ["oracle-float64"],
         "head_dim >= 64 past 128 tokens: key tiles of 128 masked with tile-local key indices (future keys leak)"),
    _bug(MHA, LongContextPathHalfScale, "size", ["oracle-float64"],
         "head_dim >= 64 past 512 tokens: the scores scaled by 1/sqrt(head_dim / 2)"),
    _bug(MHA, QueryChunksDropTheTail, "size", ["oracle-float64"],
         "past 2**22 scores, queries in chunks: the last T % chunk queries are left at zero"),
    _bug(MHA, FoldedBmmWithoutTranspose, "size", ["oracle-float64"],
         "past 64 batch x heads the heads are folded into the batch without a transpose"),
    _bug(MHA, KeyChunksOf1024LocalMask, "size", ["oracle-float64"],
         "key chunks of 1024: each chunk's causal mask uses chunk-local key indices (wrong past 1024 tokens)"),
]


class DropoutGeneratorFromInitialSeed(CausalSteps):
    """Red-team pass 11: "reproducible dropout": the mask is drawn from a generator made in forward and seeded with
    torch.initial_seed(), which torch.manual_seed sets but training steps do not advance: every step drops the
    same weights."""

    def drop(self, w):
        if not self.training or self.dropout.p == 0:
            return w
        generator = torch.Generator().manual_seed(torch.initial_seed())
        keep = torch.rand(w.shape, generator=generator) >= self.dropout.p
        return w * keep / (1 - self.dropout.p)


CORPUS += [
    _bug(CA, DropoutGeneratorFromInitialSeed, "history", ["train-masks-vary"],
         "dropout drawn from a generator seeded with torch.initial_seed() in forward: every training step the same mask"),
]


class CacheKeptInFirstGenerationsDtype(GroupedQueryAttention):
    """Red-team pass 11: a static KV cache allocated at the first generation and kept across reset_cache() (only its
    write position goes back, as Hugging Face's StaticCache.reset) holds keys and values in that generation's dtype:
    after one in bfloat16, float32 decoding reads them rounded."""

    def forward(self, x, use_cache=False, attention_mask=None):
        out = super().forward(x, use_cache=use_cache, attention_mask=attention_mask)
        if use_cache:
            kept = self.__dict__.setdefault("cache_dtype", x.dtype)
            self.cache_k, self.cache_v = (t.to(kept).to(t.dtype) for t in (self.cache_k, self.cache_v))
        return out


CORPUS += [
    _bug(GQA, CacheKeptInFirstGenerationsDtype, "history", ["kv-cache-decoding"],
         "the KV cache keeps the dtype of the module's first generation: float32 decoding after bfloat16 is rounded"),
]


# --- Red-team pass 12: sizes the landmarks did not reach -----------------------------------------------------


class PadToMultipleOf8Unmasked(MultiHeadAttention):
    """Red-team pass 12: a "tensor-core aligned" path for batch x heads > 4 from 16 tokens left-pads the sequence with
    zero tokens to a multiple of 8 and keeps the last T output rows, without masking the pad: every query attends
    the pad's keys. Only for T % 8 != 0 (the 203-token landmark)."""

    def forward(self, x):
        b, T, d = x.shape
        if b * self.num_heads <= 4 or T < 16 or T % 8 == 0:
            return super().forward(x)
        pad = 8 - T % 8
        xp = torch.cat([x.new_zeros(b, pad, d), x], dim=1)
        q, k, v = (w(xp).view(b, T + pad, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        s = (q @ k.transpose(2, 3)).masked_fill(torch.ones(T + pad, T + pad, dtype=torch.bool).triu(1), -torch.inf)
        w = self.dropout(torch.softmax(s / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, T + pad, self.d_out))[:, pad:]


class FusedRotaryIgnoresFraction(GroupedQueryAttention):
    """Red-team pass 12: a fused rotary kernel taken for head_dim >= 64 once positions reach 256 rotates the whole
    head (rope_fraction ignored: inv_freq over head_dim). Only with partial rotary (the 520-token landmark's half)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False,
                 rope_base=None, rope_fraction=1.0, rope_interleaved=False, window=None):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, num_kv_heads, qkv_bias, rope_base,
                         rope_fraction, rope_interleaved, window)
        self.base = rope_base

    def rope(self, t, start):
        end = start + t.shape[2]
        if self.cos is None or self.head_dim < 64 or end < 256:
            return super().rope(t, start)
        base = self.base
        inv = base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.arange(start, end, dtype=torch.float64)[:, None] * inv
        return rotate(t, angles.cos().to(t.dtype), angles.sin().to(t.dtype), self.rope_interleaved)


CORPUS += [
    _bug(MHA, PadToMultipleOf8Unmasked, "size", ["oracle-float64"],
         "batch x heads > 4 from 16 tokens: the sequence left-padded to a multiple of 8, the pad not masked"),
    _bug(GQA, FusedRotaryIgnoresFraction, "size", ["oracle-float64"],
         "head_dim >= 64 from position 256: a fused rotary path rotates the whole head, whatever rope_fraction"),
]


# --- Red-team pass 12: gradients and call history ----------------------------------------------------------


class _SoftmaxGradientInPlace(torch.autograd.Function):
    """softmax saving its output through .data and computing the gradient in place in it, to save memory."""

    @staticmethod
    def forward(ctx, s):
        y = torch.softmax(s, dim=-1)
        ctx.y = y.data
        return y

    @staticmethod
    def backward(ctx, g):
        y = ctx.y
        return y.mul_(g - (g * y).sum(-1, keepdim=True))


class SoftmaxBackwardOverwritesSaved(CausalAttention):
    """Red-team pass 12: the softmax's backward overwrites its saved output: the first backward is right, a second
    one through the same graph (retain_graph=True: two losses, GAN steps) is wrong."""

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        s = (q @ k.transpose(1, 2)).masked_fill(self.mask.bool()[:T, :T], -torch.inf) / k.shape[-1] ** 0.5
        return self.dropout(_SoftmaxGradientInPlace.apply(s)) @ v


class WeightsListedAtConstruction(MultiHeadAttention):
    """Red-team pass 12: the q/k/v weights are gathered once, at construction, into a plain list for one fused
    matmul; load_state_dict(assign=True) (meta-device init, then a checkpoint) puts new Parameters in place and
    forward keeps the old ones."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self._weights = [self.W_query.weight, self.W_key.weight, self.W_value.weight]
        self._biases = [self.W_query.bias, self.W_key.bias, self.W_value.bias] if qkv_bias else None

    def forward(self, x):
        b, T, _ = x.shape
        qkv = F.linear(x, torch.cat(self._weights), None if self._biases is None else torch.cat(self._biases))
        q, k, v = qkv.view(b, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:T, :T], -torch.inf)
        w = self.dropout(torch.softmax(s / self.head_dim ** 0.5, dim=-1))
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, T, self.d_out))


class ProjectionInAClosure(MultiHeadAttention):
    """Red-team pass 12: the q/k/v projection is a lambda closing over self; copy.deepcopy (an EMA or teacher model)
    copies functions by reference, so the copy computes with the original's weights."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        self._project = lambda x: (self.W_query(x), self.W_key(x), self.W_value(x))

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (t.view(b, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self._project(x))
        s = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:T, :T], -torch.inf) / self.head_dim ** 0.5
        return self.out_proj((self.dropout(torch.softmax(s, dim=-1)) @ v).transpose(1, 2).reshape(b, T, self.d_out))


CORPUS += [
    _bug(CA, SoftmaxBackwardOverwritesSaved, "gradient", ["gradient-oracle"],
         "a second backward through the same graph (retain_graph=True) gives other gradients: the backward overwrites "
         "the softmax output it saved"),
    _bug(MHA, WeightsListedAtConstruction, "call history", ["parameter-update-respected"],
         "q/k/v weights kept in a plain list: stale after load_state_dict(assign=True)"),
    _bug(MHA, ProjectionInAClosure, "call history", ["parameter-update-respected"],
         "q/k/v projection in a lambda over self: a copy.deepcopy computes with the original's weights"),
]


class _SoftmaxDropoutMaskIgnoredInBackward(torch.autograd.Function):
    """softmax then dropout in one Function; the backward takes the incoming gradient as the softmax output's,
    ignoring the mask and the 1 / (1 - p)."""

    @staticmethod
    def forward(ctx, s, p):
        y = torch.softmax(s, dim=-1)
        keep = torch.rand_like(y) >= p
        ctx.save_for_backward(y)
        return y * keep / (1 - p)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True)), None


class FusedSoftmaxDropoutNotInFloat64(CausalAttention):
    """Red-team pass 12: train mode at p > 0 takes a fused softmax-dropout kernel whose backward ignores the mask;
    float64, which the kernel does not support, falls back to softmax and nn.Dropout (where finite differences ran)."""

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        s = (q @ k.transpose(1, 2)).masked_fill(self.mask.bool()[:T, :T], -torch.inf) / k.shape[-1] ** 0.5
        p = self.dropout.p
        if self.training and p > 0 and x.dtype != torch.float64:
            return _SoftmaxDropoutMaskIgnoredInBackward.apply(s, p) @ v
        return self.dropout(torch.softmax(s, dim=-1)) @ v


class _DropoutAddSharedGradient(torch.autograd.Function):
    """residual + dropout(branch) in one Function (Megatron's bias_dropout_add without the bias); the backward hands
    the residual the branch's masked gradient too (one buffer for both)."""

    @staticmethod
    def forward(ctx, branch, residual, p):
        keep = (torch.rand_like(branch) >= p).to(branch.dtype) / (1 - p)
        ctx.save_for_backward(keep)
        return residual + branch * keep

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep, g * keep, None


class FusedDropoutAddNotInFloat64(TransformerBlock):
    """Red-team pass 12: in training at p > 0, outside float64, the shortcut dropout and the residual add run fused,
    and the residual's gradient is masked and rescaled like the branch's."""

    def forward(self, x):
        p = self.drop_shortcut.p
        if not (self.training and p > 0 and x.dtype != torch.float64):
            return super().forward(x)
        x = _DropoutAddSharedGradient.apply(self.att(self.norm1(x)), x, p)
        return _DropoutAddSharedGradient.apply(self.ff(self.norm2(x)), x, p)


CORPUS += [
    _bug(CA, FusedSoftmaxDropoutNotInFloat64, "gradient", ["gradient-finite-differences"],
         "outside float64, train mode at p > 0: a fused softmax-dropout whose backward ignores the mask"),
    _bug(TB, FusedDropoutAddNotInFloat64, "gradient", ["gradient-finite-differences"],
         "outside float64, train mode at p > 0: a fused dropout-add whose backward masks the residual's gradient too"),
]


class _SoftmaxRecomputedWithoutPadding(torch.autograd.Function):
    """A masked softmax that saves the scores and recomputes the softmax in backward (to save memory), re-applying the
    causal mask only: the padding mask forward got is forgotten."""

    @staticmethod
    def forward(ctx, s, causal, padded):
        ctx.save_for_backward(s)
        ctx.causal = causal
        return torch.softmax(s.masked_fill(causal | padded, -torch.inf), dim=-1)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        y = torch.softmax(s.masked_fill(ctx.causal, -torch.inf), dim=-1)
        return y * (g - (g * y).sum(-1, keepdim=True)), None, None


class BackwardForgetsPaddingMask(GroupedQueryAttention):
    """Red-team pass 12: forward is right with and without padding; with a padding mask the backward recomputes the
    softmax without it, so a padded batch trains on wrong gradients and its padded tokens get gradient."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if attention_mask is None or use_cache:
            return super().forward(x, use_cache=use_cache, attention_mask=attention_mask)
        b, T, _ = x.shape
        q = self.rope(self.W_query(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2), 0)
        k = self.rope(self.W_key(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2), 0)
        v = self.W_value(x).view(b, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        g = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ k.transpose(2, 3)) / self.head_dim ** 0.5
        w = _SoftmaxRecomputedWithoutPadding.apply(s, self.mask.bool()[:T, :T], self.padded(attention_mask, 0))
        return self.out_proj((self.dropout(w) @ v).transpose(1, 2).reshape(b, T, self.d_out))


CORPUS += [
    _bug(GQA, BackwardForgetsPaddingMask, "gradient", ["padding-gradients"],
         "with a padding mask, the backward recomputes the softmax without it: padded tokens get gradient"),
]


class KVCacheCappedAt1024(GroupedQueryAttention):
    """Red-team pass 12: the KV cache keeps the last 1024 tokens (a max_cache_len copied from a serving config), though
    the module attends its whole context: past 1024 cached tokens the oldest are evicted (kv-cache-decoding's
    1031-token landmark)."""

    def forward(self, x, use_cache=False, attention_mask=None):
        out = super().forward(x, use_cache=use_cache, attention_mask=attention_mask)
        if use_cache and self.cache_k is not None and self.cache_k.shape[2] > 1024:
            self.cache_k, self.cache_v = self.cache_k[:, :, -1024:], self.cache_v[:, :, -1024:]
        return out


CORPUS += [
    _bug(GQA, KVCacheCappedAt1024, "size", ["kv-cache-decoding"],
         "the KV cache keeps the last 1024 tokens only: decoding past 1024 tokens loses the first keys"),
]


class _HalfScaledMaskedSoftmax(torch.autograd.Function):
    """Megatron-style FusedScaleMaskSoftmax (float16/bfloat16 only): softmax(mask(scores) * scale) in one kernel; the
    backward returns the gradient with respect to the scaled scores, without the factor ``scale``."""

    @staticmethod
    def forward(ctx, scores, mask, scale):
        y = torch.softmax((scores * scale).masked_fill(mask, -torch.inf).float(), dim=-1).to(scores.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gf, yf = g.float(), y.float()
        return (yf * (gf - (gf * yf).sum(-1, keepdim=True))).to(g.dtype), None, None


class HalfPrecisionFusedSoftmaxBackwardUnscaled(MultiHeadAttention):
    """Red-team pass 12: float16/bfloat16 scores take a fused scale-mask-softmax kernel (as Megatron's does only for
    16-bit input), whose backward forgets the scale; float32 and float64 use torch.softmax."""

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (w(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        s, mask = q @ k.transpose(2, 3), self.mask.bool()[:T, :T]
        if s.dtype in (torch.float16, torch.bfloat16):
            w = _HalfScaledMaskedSoftmax.apply(s, mask, self.head_dim ** -0.5)
        else:
            w = torch.softmax(s.masked_fill(mask, -torch.inf) * self.head_dim ** -0.5, dim=-1)
        return self.out_proj((self.dropout(w) @ v).transpose(1, 2).reshape(b, T, self.d_out))


CORPUS += [
    _bug(MHA, HalfPrecisionFusedSoftmaxBackwardUnscaled, "gradient", ["gradient-oracle"],
         "float16/bfloat16 only: a fused softmax whose backward leaves out the scale"),
]
