"""The seed's attention modules (and the GPT-2 block it leaves unfinished, and a modern grouped-query one). Imports nothing from spec."""

from attnspec.impl.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)
from attnspec.impl.gpt import GELU, FeedForward, LayerNorm, TransformerBlock
from attnspec.impl.modern import GroupedQueryAttention

__all__ = [
    "SelfAttention_v1",
    "SelfAttention_v2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "GroupedQueryAttention",
]
