"""Kinds: the contracts a module is checked against, and the configuration they are built from.

A kind knows the constructor call, the input and output shapes, and which configurations are valid.
"""

import dataclasses
import json
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Drawn by default, float32 first (the simplest). float16/bfloat16 run where the module supports them
# (spec.runner.unsupported_dtype); tolerances follow the dtype (spec.tolerance).
DEFAULT_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Config:
    """One drawn configuration: module hyper-parameters, input shape, input scale and offset, dtype, seed."""

    d_in: int
    d_out: int
    num_heads: int
    context_length: int
    num_tokens: int
    batch: int
    dropout: float
    qkv_bias: bool
    dtype: str  # a key of DTYPES, so the config is plain JSON
    scale: float  # the input is offset + scale * N(0, 1)
    seed: int
    device: str = "cpu"
    offset: float = 0.0  # added after the other fields: repro JSON written before it still parses

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def head_dim(self):
        return self.d_out // self.num_heads

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def input_magnitude(self):
        """(offset, scale) of the input, shrunk together where the dtype cannot represent the scores:
        they grow like |x|^2 * d (and x^3 in GELU), so |offset| + scale stays <= finfo.max^(1/4) / 4
        (float16: 4; float32 and bfloat16: ~1e9, i.e. never shrunk)."""
        limit = torch.finfo(self.torch_dtype).max ** 0.25 / 4
        size = abs(self.offset) + self.scale
        shrink = limit / size if size > limit else 1.0
        return self.offset * shrink, self.scale * shrink

    def random_input(self, shape, salt=0):
        """offset + scale * N(0, 1) of ``shape`` in the config's dtype (see ``input_magnitude``), from a
        generator seeded by seed+salt."""
        generator = torch.Generator().manual_seed(self.seed + salt)
        offset, scale = self.input_magnitude()
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
        return x.to(device=self.device, dtype=self.torch_dtype)


@dataclass(frozen=True)
class Kind:
    """A contract: how to construct a module of this kind and what its forward maps to."""

    name: str
    summary: str
    signature: str  # the constructor, as a user writes it
    batched: bool  # input (batch, num_tokens, d_in), else (num_tokens, d_in)
    causal: bool  # output at position t depends only on positions <= t
    has_dropout: bool  # the constructor takes a dropout probability
    multi_head: bool  # num_heads is meaningful

    def constructor_args(self, cfg):
        """(args, kwargs) for the kind's constructor, in the seed's argument order."""
        if self.name == "self-attention":
            return (cfg.d_in, cfg.d_out), ({"qkv_bias": True} if cfg.qkv_bias else {})
        if self.name == "causal-attention":
            return (cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout), {"qkv_bias": cfg.qkv_bias}
        if self.name in ("mha-wrapper", "mha"):
            return (cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads), {"qkv_bias": cfg.qkv_bias}
        block_cfg = {
            "emb_dim": cfg.d_in,
            "context_length": cfg.context_length,
            "dropout": cfg.dropout,
            "num_heads": cfg.num_heads,
            "qkv_bias": cfg.qkv_bias,
            "n_heads": cfg.num_heads, "drop_rate": cfg.dropout,  # llms-from-scratch's keys for the same
        }
        return (block_cfg,), {}

    def input_shape(self, cfg, num_tokens=None, batch=None):
        t = cfg.num_tokens if num_tokens is None else num_tokens
        b = cfg.batch if batch is None else batch
        return (b, t, cfg.d_in) if self.batched else (t, cfg.d_in)

    def output_shape(self, cfg, num_tokens=None, batch=None):
        width = cfg.num_heads * cfg.d_out if self.name == "mha-wrapper" else cfg.d_out
        return self.input_shape(cfg, num_tokens, batch)[:-1] + (width,)

    def attention_head_dim(self, cfg):
        """The d_k that scores are divided by sqrt of."""
        return cfg.head_dim if self.name in ("mha", "transformer-block") else cfg.d_out

    def attention_heads(self, cfg):
        return cfg.num_heads if self.multi_head else 1

    def invalid_reason(self, cfg):
        """Why ``cfg`` is not a valid configuration of this kind, or None."""
        if not 1 <= cfg.num_tokens <= cfg.context_length:
            return f"num_tokens={cfg.num_tokens} must be in [1, context_length={cfg.context_length}]"
        if not 0.0 <= cfg.dropout < 1.0:
            return f"dropout={cfg.dropout} must be in [0, 1)"
        if self.name in ("mha", "transformer-block") and cfg.d_out % cfg.num_heads:
            return f"d_out={cfg.d_out} must be divisible by num_heads={cfg.num_heads}"
        if self.name == "transformer-block" and cfg.d_in != cfg.d_out:
            return f"a transformer block has d_in == d_out == emb_dim, got d_in={cfg.d_in}, d_out={cfg.d_out}"
        if not self.multi_head and cfg.num_heads != 1:
            return f"{self.name} has one head, got num_heads={cfg.num_heads}"
        if not self.batched and cfg.batch != 1:
            return f"{self.name} is unbatched, got batch={cfg.batch}"
        return None


KINDS = {
    k.name: k
    for k in [
        Kind("self-attention", "unbatched, not causal (SelfAttention_v1/_v2)", "(d_in, d_out[, qkv_bias])",
             batched=False, causal=False, has_dropout=False, multi_head=False),
        Kind("causal-attention", "one causal head with dropout on the weights (CausalAttention)",
             "(d_in, d_out, context_length, dropout, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=False),
        Kind("mha-wrapper", "num_heads causal heads concatenated, width num_heads*d_out (MultiHeadAttentionWrapper)",
             "(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=True),
        Kind("mha", "causal multi-head attention with the head split and out_proj (MultiHeadAttention)",
             "(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=True),
        Kind("transformer-block", "GPT-2 pre-LayerNorm block (TransformerBlock)",
             "(cfg: dict with emb_dim, context_length, dropout, num_heads, qkv_bias)",
             batched=True, causal=True, has_dropout=True, multi_head=True),
    ]
}
