"""Adapters for Hugging Face transformers' GPT-2 attention and block, eager and sdpa, built from a small
``GPT2Config`` with random initialization (nothing is downloaded), and for Llama, Mistral and Qwen2
attention (kind gqa, at the end of this module):

    attnspec check attnspec.adapters.transformers:GPT2Attention attnspec.adapters.transformers:GPT2AttentionSDPA \
                   attnspec.adapters.transformers:GPT2Block attnspec.adapters.transformers:GPT2BlockSDPA
    attnspec check attnspec.adapters.transformers:LlamaAttention attnspec.adapters.transformers:MistralAttention \
                   attnspec.adapters.transformers:Qwen2Attention

Needs transformers (``pip install -c constraints.txt 'attnspec[transformers]'``, which keeps the
installed torch). The configuration is mapped onto the seed's: n_embd = d_out (= d_in), n_head =
num_heads, n_positions = context_length, activation gelu_new (the tanh GELU), layer_norm_epsilon =
1e-5, scale_attn_weights (1/sqrt(head_dim)), one layer (layer_idx 0). Dropout: attn_pdrop = p on the
attention weights in both; resid_pdrop = 0 for ``mha`` (the seed's MultiHeadAttention has no dropout
after out_proj) and p for the block (the seed's drop_shortcut on both residual branches; GPT-2 applies
it inside attn and mlp, on the branch before the addition, which is the same thing).

GPT-2's Conv1D stores weights as (in, out) and always has a bias: ``projections`` gives nn.Linear
(out, in) views of c_attn's q, k, v thirds (in that order), c_proj, c_fc; ``adjust`` draws d_in =
d_out and qkv_bias = True. The attention returns ``(output, weights)``: the ``mha`` module returns
the output only; in the block, the attention sub-layer is a ``SubLayer`` that reads the first element.
The causal mask is the one GPT2Model passes: an additive (1, 1, T, T) mask, finfo.min above the
diagonal, for eager; None for sdpa, which then calls SDPA with is_causal=True.
"""

import torch
import torch.nn as nn

from attnspec.adapters.base import SubLayer, causal_mask
from attnspec.errors import UsageError
from attnspec.targets import Adapter

try:
    from transformers import GPT2Config
    from transformers.models.gpt2 import modeling_gpt2
except ImportError as e:
    raise UsageError(f"attnspec.adapters.transformers needs Hugging Face transformers ({e}): "
                     f"pip install -c constraints.txt 'attnspec[transformers]' (the constraints file pins torch, "
                     f"so pip keeps the installed wheel)") from None


def gpt2_config(cfg, attn_implementation, resid_pdrop, activation_function="gelu_new"):
    """A one-layer GPT2Config with the seed's hyper-parameters (see the module docstring)."""
    config = GPT2Config(vocab_size=8, bos_token_id=0, eos_token_id=0, n_positions=cfg.context_length,
                        n_embd=cfg.d_out, n_layer=1, n_head=cfg.num_heads, activation_function=activation_function,
                        attn_pdrop=cfg.dropout, resid_pdrop=resid_pdrop, embd_pdrop=resid_pdrop, layer_norm_epsilon=1e-5,
                        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                        # GPT-2's 0.02 makes every score ~0: uniform weights that hide scaling and mask bugs.
                        # Unit-scale weights (std 1/sqrt(emb)) give the scores the spread trained models have.
                        initializer_range=cfg.d_out ** -0.5)
    config._attn_implementation = attn_implementation
    return config


def attention_mask(x, config):
    """What GPT2Model passes for an unpadded batch: None for sdpa (is_causal), else the additive
    (1, 1, T, T) mask with finfo(dtype).min on the future."""
    if config._attn_implementation != "eager":
        return None
    t = x.shape[-2]
    mask = torch.zeros(t, t, dtype=x.dtype, device=x.device)
    return mask.masked_fill(causal_mask(t).to(x.device), torch.finfo(x.dtype).min)[None, None]


def conv1d(conv, parts=1, i=0):
    """Conv1D (weight (in, out)) as nn.Linear's (weight (out, in), bias): the i-th of ``parts`` equal column blocks."""
    size = conv.weight.shape[1] // parts
    columns = slice(i * size, (i + 1) * size)
    return conv.weight.detach()[:, columns].T, conv.bias.detach()[columns]


def attention_projections(attn):
    """c_attn's output splits into q, k, v (``split(split_size, dim=2)``, in that order), then c_proj."""
    parts = {name: conv1d(attn.c_attn, 3, i) for i, name in enumerate(("query", "key", "value"))}
    parts["out"] = conv1d(attn.c_proj)
    return parts


class CausalGPT2Attention(nn.Module):
    """forward(x) = attn(x, attention_mask=GPT2Model's causal mask)[0]: the attention output only."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, attention_mask=attention_mask(x, self.attn.config))[0]


class CausalGPT2Block(nn.Module):
    """forward(x) = block(x, attention_mask=GPT2Model's causal mask)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x, attention_mask=attention_mask(x, self.block.attn.config))
        return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


class GPT2Attention(Adapter):
    """``transformers``' GPT2Attention (eager), checked as kind ``mha``. ``attention_class``: the class
    built (a subclass of GPT2Attention, e.g. your own)."""

    kind = "mha"
    attn_implementation = "eager"
    attention_class = modeling_gpt2.GPT2Attention

    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out, qkv_bias=True)

    def build(self, cfg):
        config = gpt2_config(cfg, self.attn_implementation, resid_pdrop=0.0)
        return CausalGPT2Attention(self.attention_class(config, layer_idx=0))

    def projections(self, module):
        return attention_projections(module.attn)


class GPT2AttentionSDPA(GPT2Attention):
    """GPT2Attention with ``attn_implementation="sdpa"`` (F.scaled_dot_product_attention)."""

    attn_implementation = "sdpa"


class GPT2Block(Adapter):
    """``transformers``' GPT2Block (eager attention), checked as kind ``transformer-block``.
    ``block_class``: the class built; ``attention_class``, if set, replaces the block's attention;
    ``activation_function``: GPT2Config's (``"gelu"``, the erf GELU, is the ``gelu-erf`` variant)."""

    kind = "transformer-block"
    attn_implementation = "eager"
    activation_function = "gelu_new"
    block_class = modeling_gpt2.GPT2Block
    attention_class = None

    def adjust(self, cfg):
        return cfg.replace(qkv_bias=True)

    def build(self, cfg):
        config = gpt2_config(cfg, self.attn_implementation, resid_pdrop=cfg.dropout,
                             activation_function=self.activation_function)
        block = self.block_class(config, layer_idx=0)
        if self.attention_class is not None:
            block.attn = self.attention_class(config, layer_idx=0)
        return CausalGPT2Block(block)

    def projections(self, module):
        block = module.block
        return {"att": attention_projections(block.attn),
                "norm1": (block.ln_1.weight, block.ln_1.bias), "norm2": (block.ln_2.weight, block.ln_2.bias),
                "ff": [conv1d(block.mlp.c_fc), conv1d(block.mlp.c_proj)]}

    def sublayers(self, module):
        return SubLayer(module.block.attn), module.block.mlp


class GPT2BlockSDPA(GPT2Block):
    """GPT2Block with ``attn_implementation="sdpa"``."""

    attn_implementation = "sdpa"


# --- Llama, Mistral, Qwen2 (kind gqa, issue 13) ---------------------------------------------------

from transformers import DynamicCache, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402


class CausalRotaryAttention(nn.Module):
    """A Hugging Face Llama-family attention called as its model calls it (LlamaModel/MistralModel.forward):
    position ids after the cached tokens, (cos, sin) from the model's rotary embedding, the mask of
    ``create_causal_mask`` (``create_sliding_window_causal_mask`` when config.sliding_window is set), and,
    with ``use_cache=True``, transformers' own ``DynamicCache`` (``reset_cache()`` starts a new one,
    ``crop_cache(n)`` is ``DynamicCache.crop``).
    forward returns the attention output only (the module returns ``(output, weights)``). The rotary
    embedding is kept out of ``module.to(dtype)``: its inverse frequencies stay float32, as in a model
    loaded with ``dtype=``."""

    def __init__(self, attn, rotary, config):
        super().__init__()
        self.attn, self.config = attn, config
        self.__dict__["rotary"] = rotary  # not a submodule: see above
        self.masks = {}  # (batch, num_tokens, dtype, device) -> the mask without padding or cache
        self.reset_cache()

    def reset_cache(self):
        self.cache = None

    def crop_cache(self, n):
        """Keep the first n cached tokens: ``DynamicCache.crop(-removed)`` (transformers 5 counts the tokens
        removed; a sliding-window layer can crop past its window because the cache records its past)."""
        if self.cache is not None and self.cache.get_seq_length() > n:
            self.cache.crop(n - self.cache.get_seq_length())

    def new_cache(self):
        cache = DynamicCache(config=self.config)
        cache.activate_past_recording()  # sliding-window layers keep every token, so crop_cache can go back
        return cache

    def past_length(self, cache):
        """The number of tokens before x's: its first position."""
        return cache.get_seq_length() if cache is not None else 0

    def rotary_embeddings(self, x, position_ids):
        """(cos, sin) as the model's rotary embedding computes them (in float32, whatever x's dtype), except
        for float64 input: then its formula in float64 (cat(freqs, freqs) of positions times its inv_freq,
        times its attention_scaling), so that a float64 run is float64-precise in the angles, which grow
        with the position (the model's float32 angles are checked in the float32 and half runs)."""
        rotary = self.rotary.to(x.device)
        if x.dtype != torch.float64:
            return rotary(x, position_ids)
        freqs = position_ids[..., None].double() * rotary.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(rotary, "attention_scaling", 1.0)
        return emb.cos() * scaling, emb.sin() * scaling

    def mask(self, x, attention_mask, cache, position_ids):
        """The model's mask: ``create_causal_mask`` (``create_sliding_window_causal_mask`` with a window) of the
        padding mask, the cache and the positions. Without padding or cache it depends on x's batch, length,
        dtype and device alone, so it is made once for each (a third of a small forward's time otherwise)."""
        key = (x.shape[0], x.shape[1], x.dtype, x.device) if attention_mask is None and cache is None else None
        if key in self.masks:
            return self.masks[key]
        make_mask = create_causal_mask if getattr(self.config, "sliding_window", None) is None \
            else create_sliding_window_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask, past_key_values=cache,
                         position_ids=position_ids)
        if key is not None:
            self.masks[key] = mask
        return mask

    def forward(self, x, use_cache=False, attention_mask=None):
        """``attention_mask`` (batch, cached + num_tokens), True/1 at real tokens: the 2-D padding mask the model
        gets from its tokenizer, turned by ``create_causal_mask`` into the 4-D mask of the attention
        implementation (additive for eager, bool for sdpa) with the causal band and the window."""
        if use_cache and self.cache is None:
            self.cache = self.new_cache()
        cache = self.cache if use_cache else None
        start = self.past_length(cache)
        position_ids = (torch.arange(x.shape[1], device=x.device) + start)[None]
        mask = self.mask(x, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_embeddings(x, position_ids)
        return self.attn(x, position_embeddings=position_embeddings, attention_mask=mask, past_key_values=cache)[0]


def rotary_projections(attn):
    """Llama-family attentions have separate q_proj, k_proj, v_proj, o_proj nn.Linear's."""
    return {n: (p.weight, p.bias) for n, p in
            (("query", attn.q_proj), ("key", attn.k_proj), ("value", attn.v_proj), ("out", attn.o_proj))}


class LlamaAttention(Adapter):
    """``transformers``' LlamaAttention (eager), checked as kind ``gqa`` without the sliding window
    (``features``): hidden_size = d_out (= d_in), num_key_value_heads = num_kv_heads, head_dim = d_out /
    num_heads, rope_theta = rope_base, attention_dropout = p, attention_bias = qkv_bias (o_proj's bias too:
    Llama has one flag). ``adjust`` draws what Llama supports: d_in = d_out, rotary always on (base 10000
    when drawn off), on the full head (fraction 1), half-split pairs (``rotate_half``).
    ``attention_class``/``rotary_class``: the classes built (subclass them to check your own)."""

    kind = "gqa"
    features = ("grouped_kv", "rotary")
    attn_implementation = "eager"
    config_class = LlamaConfig
    attention_class, rotary_class = modeling_llama.LlamaAttention, modeling_llama.LlamaRotaryEmbedding
    qkv_bias = None  # None: as drawn; a bool: what the model always has

    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out, rope_base=cfg.rope_base or 10000.0, rope_fraction=1.0, rope_interleaved=False,
                           qkv_bias=cfg.qkv_bias if self.qkv_bias is None else self.qkv_bias)

    def config(self, cfg):
        config = self.config_class(vocab_size=8, hidden_size=cfg.d_out, intermediate_size=4, num_hidden_layers=1,
                                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                                   head_dim=cfg.head_dim, max_position_embeddings=cfg.context_length,
                                   rope_theta=cfg.rope_base, attention_dropout=cfg.dropout)
        if self.qkv_bias is None:
            config.attention_bias = cfg.qkv_bias
        config._attn_implementation = self.attn_implementation
        return config

    wrapper_class = CausalRotaryAttention  # how the model calls the attention

    def shared_config(self, cfg):
        """``self.config(cfg)``, built once per configuration up to what no config reads (the seed, the input's
        scale and offset, its length and batch) and shared, read-only, by the modules built from it: a
        config's validation costs about as much as building the attention."""
        key = cfg.replace(seed=0, scale=1.0, offset=0.0, num_tokens=1, batch=1)
        configs = self.__dict__.setdefault("_configs", {})
        if key not in configs:
            configs[key] = self.config(cfg)
        return configs[key]

    def build(self, cfg):
        config = self.shared_config(cfg)
        return self.wrapper_class(self.attention_class(config, layer_idx=0), self.rotary_class(config), config)

    def projections(self, module):
        return rotary_projections(module.attn)


class LlamaAttentionSDPA(LlamaAttention):
    """LlamaAttention with ``attn_implementation="sdpa"`` (F.scaled_dot_product_attention)."""

    attn_implementation = "sdpa"


class MistralAttention(LlamaAttention):
    """``transformers``' MistralAttention (eager): Llama's, with every feature of ``gqa``: the sliding window
    (config.sliding_window = window, applied by the model's mask: key j attends query i iff i - window < j
    <= i, the oracle's convention) and no projection bias."""

    features = None  # all of gqa's
    config_class = MistralConfig
    attention_class, rotary_class = modeling_mistral.MistralAttention, modeling_mistral.MistralRotaryEmbedding
    qkv_bias = False

    def config(self, cfg):
        config = super().config(cfg)
        config.sliding_window = cfg.window
        return config


class MistralAttentionSDPA(MistralAttention):
    """MistralAttention with ``attn_implementation="sdpa"``."""

    attn_implementation = "sdpa"


class Qwen2Attention(LlamaAttention):
    """``transformers``' Qwen2Attention (eager): grouped query with a bias on q/k/v (always), none on o_proj
    (``gqa`` leaves out_proj's bias free); no sliding window (use_sliding_window=False, Qwen2's default)."""

    config_class = Qwen2Config
    attention_class, rotary_class = modeling_qwen2.Qwen2Attention, modeling_qwen2.Qwen2RotaryEmbedding
    qkv_bias = True
