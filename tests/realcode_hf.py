"""Real Hugging Face modules for tests/test_realcode.py (needs transformers; skipped without it): HF GPT2Attention (eager, sdpa) and GPT2Block, checked with attnspec's default projections."""
import torch, torch.nn as nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block
from attnspec import Adapter, Unsupported


def _config(cfg, impl, resid_pdrop=0.0):
    """GPT-2's config; the attention alone (mha) without its residual dropout, the block with it (GPT-2's resid_pdrop:
    the seed's drop_shortcut)."""
    c = GPT2Config(n_embd=cfg.d_out, n_head=cfg.num_heads, n_positions=cfg.context_length, attn_pdrop=cfg.dropout,
                   resid_pdrop=resid_pdrop, embd_pdrop=0.0, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5)
    c._attn_implementation = impl
    return c


class Att(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = GPT2Attention(config, layer_idx=0)
        self.c_attn, self.c_proj = self.attn.c_attn, self.attn.c_proj  # the layout, at the top level

    def forward(self, x):
        t = x.shape[1]  # transformers 5 builds the causal mask in the model: an additive one, as the model does
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        return self.attn(x, attention_mask=mask)[0]


class Blk(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.blk = GPT2Block(config, layer_idx=0)
        self.attn, self.mlp, self.ln_1, self.ln_2 = self.blk.attn, self.blk.mlp, self.blk.ln_1, self.blk.ln_2

    def forward(self, x):
        t = x.shape[1]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        out = self.blk(x, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out


class _A(Adapter):
    kind, impl = "mha", "eager"
    def build(self, cfg):
        if cfg.d_in != cfg.d_out or not cfg.qkv_bias:
            raise Unsupported("GPT-2: d_in == d_out, biases")
        return Att(_config(cfg, self.impl))
    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out, qkv_bias=True)


class Eager(_A): impl = "eager"
class Sdpa(_A): impl = "sdpa"


class _B(Adapter):
    kind, impl = "transformer-block", "eager"
    def build(self, cfg):
        if not cfg.qkv_bias:
            raise Unsupported("GPT-2 biases")
        return Blk(_config(cfg, self.impl, resid_pdrop=cfg.dropout))
    def adjust(self, cfg):
        return cfg.replace(qkv_bias=True)


class BlockEager(_B): impl = "eager"
class BlockSdpa(_B): impl = "sdpa"


class NoMaskAtt(Att):
    """Bug: the attention called without the causal mask the model would build (eager is then not causal)."""

    def forward(self, x):
        return self.attn(x)[0]


class EagerWithoutMask(Eager):
    def build(self, cfg):
        module = super().build(cfg)
        module.__class__ = NoMaskAtt
        return module
