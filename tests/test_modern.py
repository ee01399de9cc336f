"""The modern features (issue 13) as the harness sees them: configurations, constructors, regressions."""

import json

from attnspec.kinds import KINDS, Config
from attnspec.runner import Options, check_target
from attnspec.targets import resolve

SEED_JSON = ('{"d_in":1,"d_out":2,"num_heads":2,"context_length":2,"num_tokens":2,"batch":1,"dropout":0.0,'
             '"qkv_bias":false,"dtype":"float32","scale":1.0,"seed":0,"device":"cpu","offset":0.0}')


def test_seed_kinds_repro_json_is_unchanged():
    """The modern fields are left out of the JSON where they are off: repro lines read as before."""
    cfg = Config.from_json(SEED_JSON)
    assert cfg.to_json() == SEED_JSON and cfg.kv_heads == 2 and cfg.rope is None and cfg.window is None
    modern = cfg.replace(num_kv_heads=1, rope_base=10.0, window=2)
    assert json.loads(modern.to_json())["window"] == 2 and Config.from_json(modern.to_json()) == modern


def test_features_are_validated_per_kind():
    mha, gqa = KINDS["mha"], KINDS["gqa"]
    cfg = Config.from_json(SEED_JSON)
    assert "no grouped kv" in mha.invalid_reason(cfg.replace(num_kv_heads=1))
    assert "no sliding window" in mha.invalid_reason(cfg.replace(window=2))
    wide = cfg.replace(d_out=8)  # head_dim 4
    assert gqa.invalid_reason(wide.replace(num_kv_heads=1, window=2, rope_base=100.0, rope_fraction=0.5)) is None
    assert "divide" in gqa.invalid_reason(wide.replace(num_kv_heads=3))
    assert "even" in gqa.invalid_reason(wide.replace(rope_base=100.0, rope_fraction=0.25))  # 1 dim of 4: not a pair
    assert "even" in gqa.invalid_reason(cfg.replace(rope_base=100.0))  # head_dim 1


def test_constructor_without_optional_keywords_is_called_without_them(tmp_path):
    """A module whose constructor lacks window (or rope_*) is built without it and drawn with the option off:
    the invariants that need the option are n/a, nothing is blamed on the module."""
    path = tmp_path / "nowindow.py"
    path.write_text("from attnspec.impl import GroupedQueryAttention\n\n"
                    "class NoWindow(GroupedQueryAttention):\n"
                    "    def __init__(self, d_in, d_out, context_length, dropout, num_heads, num_kv_heads, qkv_bias=False):\n"
                    "        super().__init__(d_in, d_out, context_length, dropout, num_heads, num_kv_heads, qkv_bias)\n")
    results = {r.invariant: r for r in check_target(resolve(f"gqa={path}:NoWindow"), Options(
        max_examples=5, only=("oracle-float64", "sliding-window", "rotary-embedding"))).results}
    assert results["oracle-float64"].status == "pass", results["oracle-float64"]
    assert results["sliding-window"].status == "not-applicable" and "window" in results["sliding-window"].reason
    assert results["rotary-embedding"].status == "not-applicable"


def test_saturated_softmax_zero_gradient_is_not_a_violation():
    """Rotary angles on off-centre input put scores thousands apart: the softmax saturates, weights are 0
    and 1 exactly and the key projection's gradient is exactly 0, while a large step of it moves the
    output. gradient-reaches-parameters once failed the bundled module here."""
    example = Config.from_json(
        '{"d_in":1,"d_out":2,"num_heads":1,"context_length":2,"num_tokens":2,"batch":1,"dropout":0.0,'
        '"qkv_bias":false,"dtype":"float32","scale":1.0,"seed":39,"device":"cpu","offset":100.0,'
        '"num_kv_heads":1,"rope_base":10000.0}')
    (result,) = check_target(resolve("gqa=attnspec.impl:GroupedQueryAttention"),
                             Options(only=("gradient-reaches-parameters",)), example=example).results
    assert result.status == "pass", result
