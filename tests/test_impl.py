"""Properties of the bundled modules beyond the catalogue: the seed's weight transfer, for any shape."""

import torch
from hypothesis import given, note
from hypothesis import strategies as st

from attnspec.impl import SelfAttention_v1, SelfAttention_v2, TransformerBlock
from attnspec.tolerance import assert_close


@given(d_in=st.integers(1, 8), d_out=st.integers(1, 8), num_tokens=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_v1_with_v2_transposed_weights_equals_v2(d_in, d_out, num_tokens, seed):
    """In[24]: copying v2's nn.Linear weights, transposed, into v1's nn.Parameters makes v1 == v2."""
    torch.manual_seed(seed)
    v1, v2 = SelfAttention_v1(d_in, d_out), SelfAttention_v2(d_in, d_out)
    for name in ("W_query", "W_key", "W_value"):
        getattr(v1, name).data = getattr(v2, name).weight.data.T.clone()
    x = torch.randn(num_tokens, d_in)
    note(f"x={x}")
    assert_close(v1(x), v2(x), dtype=x.dtype, what="v1 with v2's transposed weights vs v2")


def test_block_rejects_a_sequence_longer_than_its_context():
    block = TransformerBlock({"emb_dim": 4, "context_length": 3, "dropout": 0.0, "num_heads": 2, "qkv_bias": False})
    try:
        block(torch.randn(1, 4, 4))
    except ValueError as e:
        assert "4" in str(e) and "3" in str(e)
    else:
        raise AssertionError("a 4-token sequence in a context of 3 must raise ValueError")


def test_qkv_bias_defaults_to_false_as_in_the_seed():
    """The kinds always pass qkv_bias; the constructors' own default must still be the seed's False."""
    from attnspec.impl import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper

    modules = [SelfAttention_v2(3, 2), CausalAttention(3, 2, 4, 0.0), MultiHeadAttentionWrapper(3, 2, 4, 0.0, 2),
               MultiHeadAttention(3, 2, 4, 0.0, 2)]
    for module in modules:
        biased = [n for n, _ in module.named_parameters() if n.endswith("bias") and "out_proj" not in n]
        assert not biased, f"{type(module).__name__} has {biased} by default"
