"""Kinds: the contracts a module is checked against, and the configuration they are built from.

A kind knows the constructor call, the input and output shapes, and which configurations are valid.
"""

import dataclasses
import math
import json
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Drawn by default, float32 first (the simplest). float16/bfloat16 run where the module supports them
# (spec.runner.unsupported_dtype); tolerances follow the dtype (spec.tolerance).
DEFAULT_DTYPES = ("float32", "float64", "float16", "bfloat16")


# Fields added after the seed's kinds, with the defaults that leave them out: a configuration of a kind
# without the feature keeps them at None, and ``to_json`` omits them there, so repro lines of the
# seed's kinds read as before and JSON written before these fields still parses.
MODERN_DEFAULTS = {"num_kv_heads": None, "rope_base": None, "rope_fraction": 1.0, "rope_interleaved": False,
                   "window": None}
OMITTED = {**MODERN_DEFAULTS, "outlier": 0.0}  # fields a config's JSON leaves out at these values


@dataclass(frozen=True)
class Config:
    """One drawn configuration: module hyper-parameters, input shape, input scale and offset, dtype, seed.

    The modern features (kinds with ``grouped_kv``, ``rotary``, ``sliding_window``): ``num_kv_heads``
    K/V heads shared by groups of num_heads / num_kv_heads query heads (None: num_heads); rotary
    embeddings of base ``rope_base`` (None: none) on the first ``rope_fraction * head_dim`` dims of each
    head, in interleaved pairs (2i, 2i+1) or half-split pairs (i, i + r/2); a sliding ``window`` w
    (None: none), query i attending key j iff i - w < j <= i."""

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
    num_kv_heads: int = None  # the fields of MODERN_DEFAULTS, in its order
    rope_base: float = None
    rope_fraction: float = 1.0
    rope_interleaved: bool = False
    window: int = None
    outlier: float = 0.0  # added to one feature (seed % d_in) of every token: an LLM's "massive activations"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def head_dim(self):
        return self.d_out // self.num_heads

    @property
    def kv_heads(self):
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rotary_dim(self):
        """The number of leading dims of each head that are rotated (0 without rotary embeddings)."""
        return 0 if self.rope_base is None else round(self.rope_fraction * self.head_dim)

    @property
    def rope(self):
        """(base, rotary_dim, interleaved), or None without rotary embeddings."""
        return None if self.rope_base is None else (self.rope_base, self.rotary_dim, self.rope_interleaved)

    def to_json(self):
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in OMITTED or v != OMITTED[k]}
        return json.dumps(fields, separators=(",", ":"))
    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def input_magnitude(self):
        """(offset, scale) of the input, shrunk together where the dtype cannot represent the scores:
        they grow like |x|^2 * d (and x^3 in GELU), so |offset| + scale stays <= finfo.max^(1/4) / 4
        (float16: 4; float32 and bfloat16: ~1e9, i.e. never shrunk); and where a correct module's scores
        would overflow although its weights are in [0, 1] (the seed's SelfAttention_v1 uses torch.rand):
        q and k up to |x| d_in / 2 each, a score up to |x|^2 d_in^2 d_out / 4, kept <= finfo.max / 16,
        i.e. |x| <= sqrt(finfo.max / d_out) / (2 d_in) (float16 at d_in = 64, d_out = 8: 0.7)."""
        big = torch.finfo(self.torch_dtype).max
        limit = min(big ** 0.25 / 4, math.sqrt(big / max(self.d_out, 1)) / (2 * max(self.d_in, 1)))
        size = abs(self.offset) + self.scale
        shrink = limit / size if size > limit else 1.0
        return self.offset * shrink, self.scale * shrink

    def random_input(self, shape, salt=0):
        """offset + scale * N(0, 1) of ``shape`` in the config's dtype (see ``input_magnitude``), from a
        generator seeded by seed+salt; plus ``outlier`` on feature seed % d of every token (not shrunk: drawn only
        for a block's residual stream, which its LayerNorms normalize before any score is formed)."""
        generator = torch.Generator().manual_seed(self.seed + salt)
        offset, scale = self.input_magnitude()
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
        if self.outlier:
            x[..., self.seed % shape[-1]] += self.outlier
        return x.to(device=self.device, dtype=self.torch_dtype)


def _single(cfg):
    return (cfg.d_in, cfg.d_out), ({"qkv_bias": True} if cfg.qkv_bias else {})


def _causal(cfg):
    return (cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout), {"qkv_bias": cfg.qkv_bias}


def _multi_head(cfg):
    return (cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads), {"qkv_bias": cfg.qkv_bias}


def _block(cfg):
    block_cfg = {
        "emb_dim": cfg.d_in,
        "context_length": cfg.context_length,
        "dropout": cfg.dropout,
        "num_heads": cfg.num_heads,
        "qkv_bias": cfg.qkv_bias,
        "n_heads": cfg.num_heads, "drop_rate": cfg.dropout,  # llms-from-scratch's keys for the same
    }
    return (block_cfg,), {}


def _modern(cfg):
    args, kwargs = _multi_head(cfg)
    return args, {"num_kv_heads": cfg.kv_heads, **kwargs, "rope_base": cfg.rope_base, "rope_fraction": cfg.rope_fraction,
                  "rope_interleaved": cfg.rope_interleaved, "window": cfg.window}


# The optional features of a configuration: (Kind flag, the Config field that is None without it).
OPTIONAL = (("grouped_kv", "num_kv_heads"), ("rotary", "rope_base"), ("sliding_window", "window"))


@dataclass(frozen=True)
class Kind:
    """A contract, as a record of features: how to construct a module of this kind (``constructor``:
    cfg -> (args, kwargs), in the seed's argument order) and what its forward maps to.

    ``structure`` says what the module is made of, and so the oracle's formula and the projections'
    layout: "attention" (one attention; its heads, if any, inside it), "wrapper" (num_heads
    single-head modules whose outputs are concatenated: width num_heads * d_out), "block" (GPT-2's
    pre-LayerNorm block around an mha: x + att(LN1(x)), then + ff(LN2(.)); d_in == d_out == emb_dim)."""

    name: str
    summary: str
    signature: str  # the constructor, as a user writes it
    batched: bool  # input (batch, num_tokens, d_in), else (num_tokens, d_in)
    causal: bool  # output at position t depends only on positions <= t
    has_dropout: bool  # the constructor takes a dropout probability
    multi_head: bool  # num_heads is meaningful
    constructor: object = field(default=_multi_head, repr=False, compare=False)
    structure: str = "attention"  # "attention", "wrapper" or "block" (above)
    head_split: bool = False  # d_out = num_heads * head_dim; scores scaled by sqrt(head_dim)
    out_proj_bias: bool = True  # the contract fixes whether out_proj has a bias (seed: yes); False: either
    grouped_kv: bool = False  # num_kv_heads K/V heads, each shared by a group of query heads
    rotary: bool = False  # rotary position embeddings of queries and keys (rope_*)
    sliding_window: bool = False  # query i attends only keys j > i - window

    def features(self):
        """The optional features (names of OPTIONAL) this kind has."""
        return tuple(f for f, _ in OPTIONAL if getattr(self, f))

    def narrowed(self, features):
        """This kind with only the optional ``features`` among its own (an adapter's module that has no
        sliding window: ``KINDS["gqa"].narrowed(("grouped_kv", "rotary"))``). Same name and contract
        otherwise: no configuration with a dropped feature is drawn or valid, and an invariant that
        requires it does not apply (``Invariant.applies_to``). ValueError for a feature the kind lacks."""
        unknown = set(features) - set(self.features())
        if unknown:
            raise ValueError(f"kind {self.name} has no optional feature {', '.join(sorted(unknown))} "
                             f"(it has: {', '.join(self.features()) or 'none'})")
        return dataclasses.replace(self, **{f: f in features for f in self.features()})

    def constructor_args(self, cfg):
        """(args, kwargs) for the kind's constructor, in the seed's argument order."""
        return self.constructor(cfg)

    def input_shape(self, cfg, num_tokens=None, batch=None):
        t = cfg.num_tokens if num_tokens is None else num_tokens
        b = cfg.batch if batch is None else batch
        return (b, t, cfg.d_in) if self.batched else (t, cfg.d_in)

    def output_shape(self, cfg, num_tokens=None, batch=None):
        width = cfg.num_heads * cfg.d_out if self.structure == "wrapper" else cfg.d_out
        return self.input_shape(cfg, num_tokens, batch)[:-1] + (width,)

    def attention_head_dim(self, cfg):
        """The d_k that scores are divided by sqrt of."""
        return cfg.head_dim if self.head_split else cfg.d_out

    def attention_heads(self, cfg):
        return cfg.num_heads if self.multi_head else 1

    def oracle_heads(self, cfg):
        """(query heads, K/V heads) of one attention of the oracle: a wrapper's heads are separate attentions."""
        return (cfg.num_heads, cfg.kv_heads) if self.head_split else (1, 1)

    def projection_problem(self, cfg, parts):
        """Why the projections found (nn.Linear layout, (out, in)) cannot be this kind's, or None: with
        grouped K/V heads, the query has num_heads and the key and value num_kv_heads heads of head_dim
        rows (a fused q|k|v weight split in thirds is not that); the wrapper's, one (query, key, value) per
        head (one Linear holding every head's queries is not that)."""
        per_head = isinstance(parts, (list, tuple)) and all(isinstance(head, dict) for head in parts)
        if self.structure == "wrapper" and not (per_head and len(parts) == cfg.num_heads):
            found = f"{len(parts)} heads" if per_head else f"one set ({', '.join(map(str, parts))})" \
                if isinstance(parts, dict) else type(parts).__name__
            return (f"the projections found are {found}, not one query/key/value per head for num_heads="
                    f"{cfg.num_heads} (the wrapper's heads): an adapter can name them per head")
        if self.structure != "wrapper" and not isinstance(parts, dict):
            return f"the projections found are a {type(parts).__name__}, not named query/key/value projections"
        att = parts.get("att") if self.structure == "block" else parts if self.structure == "attention" else None
        widths = {n: tuple(att[n][0].shape) for n in ("query", "key", "value") if isinstance(att, dict) and n in att}
        if any(len(shape) != 2 or shape[1] != cfg.d_in for shape in widths.values()):
            return (f"the projections found have shapes {widths} (nn.Linear's layout, (out, in)), not taking inputs of "
                    f"d_in={cfg.d_in}: an adapter can say where they are and how they are laid out")
        if not self.grouped_kv:
            return None
        rows = {"query": cfg.num_heads * cfg.head_dim, "key": cfg.kv_heads * cfg.head_dim, "value": cfg.kv_heads * cfg.head_dim}
        found = {n: tuple(parts[n][0].shape) for n in rows if n in parts}
        if all(shape == (rows[n], cfg.d_in) for n, shape in found.items()):
            return None
        return (f"the projections found have shapes {found}, not (heads * head_dim, d_in) for num_heads={cfg.num_heads} "
                f"query and num_kv_heads={cfg.kv_heads} key/value heads: an adapter can say where they are")

    def invalid_reason(self, cfg):
        """Why ``cfg`` is not a valid configuration of this kind, or None."""
        if not 1 <= cfg.num_tokens <= cfg.context_length:
            return f"num_tokens={cfg.num_tokens} must be in [1, context_length={cfg.context_length}]"
        if not 0.0 <= cfg.dropout < 1.0:
            return f"dropout={cfg.dropout} must be in [0, 1)"
        if self.head_split and cfg.d_out % cfg.num_heads:
            return f"d_out={cfg.d_out} must be divisible by num_heads={cfg.num_heads}"
        if self.structure == "block" and cfg.d_in != cfg.d_out:
            return f"a transformer block has d_in == d_out == emb_dim, got d_in={cfg.d_in}, d_out={cfg.d_out}"
        if not self.multi_head and cfg.num_heads != 1:
            return f"{self.name} has one head, got num_heads={cfg.num_heads}"
        if not self.batched and cfg.batch != 1:
            return f"{self.name} is unbatched, got batch={cfg.batch}"
        for feature, name in OPTIONAL:
            if not getattr(self, feature) and getattr(cfg, name) is not None:
                return f"{self.name} has no {feature.replace('_', ' ')}, got {name}={getattr(cfg, name)}"
        if not (1 <= cfg.kv_heads and cfg.num_heads % cfg.kv_heads == 0):
            return f"num_kv_heads={cfg.kv_heads} must divide num_heads={cfg.num_heads}"
        if cfg.rope_base is not None and not (cfg.rope_base > 1 and 0 < cfg.rotary_dim <= cfg.head_dim
                                              and cfg.rotary_dim % 2 == 0
                                              and cfg.rotary_dim == cfg.rope_fraction * cfg.head_dim):
            return (f"rotary embeddings need rope_base > 1 and rope_fraction * head_dim an even number of dims in "
                    f"[2, head_dim], got rope_base={cfg.rope_base}, rope_fraction={cfg.rope_fraction}, head_dim={cfg.head_dim}")
        if cfg.window is not None and cfg.window < 1:
            return f"window={cfg.window} must be >= 1 (None: no window)"
        return None


KINDS = {
    k.name: k
    for k in [
        Kind("self-attention", "unbatched, not causal (SelfAttention_v1/_v2)", "(d_in, d_out[, qkv_bias])",
             batched=False, causal=False, has_dropout=False, multi_head=False, constructor=_single),
        Kind("causal-attention", "one causal head with dropout on the weights (CausalAttention)",
             "(d_in, d_out, context_length, dropout, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=False, constructor=_causal),
        Kind("mha-wrapper", "num_heads causal heads concatenated, width num_heads*d_out (MultiHeadAttentionWrapper)",
             "(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=True, structure="wrapper"),
        Kind("mha", "causal multi-head attention with the head split and out_proj (MultiHeadAttention)",
             "(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)",
             batched=True, causal=True, has_dropout=True, multi_head=True, head_split=True),
        Kind("transformer-block", "GPT-2 pre-LayerNorm block (TransformerBlock)",
             "(cfg: dict with emb_dim, context_length, dropout, num_heads, qkv_bias)",
             batched=True, causal=True, has_dropout=True, multi_head=True, constructor=_block, structure="block",
             head_split=True),
        Kind("gqa", "Llama/Mistral/Qwen-style causal attention: grouped-query K/V heads, rotary embeddings, "
             "sliding window; out_proj with or without bias; optional KV cache: forward(x, use_cache=True), reset_cache(), "
             "crop_cache(n); optional padding: forward(x, attention_mask=m), m (batch, T) True at real tokens "
             "(GroupedQueryAttention)",
             "(d_in, d_out, context_length, dropout, num_heads, num_kv_heads=None, qkv_bias=False, rope_base=None, "
             "rope_fraction=1.0, rope_interleaved=False, window=None)",
             batched=True, causal=True, has_dropout=True, multi_head=True, constructor=_modern, head_split=True,
             out_proj_bias=False, grouped_kv=True, rotary=True, sliding_window=True),
    ]
}
