"""Where the search looks (issue 9): real sizes, off-centre and large inputs, half dtypes; and the
harness defects found on the way (--example overriding an invariant's needs, dropout-unbiased's
message and memory, the binomial tail's cost). None of these may surface as a verdict on a module."""

import decimal
import math
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed

from attnspec import profiles
from attnspec.invariants import BY_ID
from attnspec.invariants.dropout import binomial_two_sided_p
from attnspec.kinds import KINDS, Config
from attnspec.runner import Options, budget, check_invariant, check_target, simplest_config, strategy_for
from attnspec.strategies import LANDMARKS, landmarks
from attnspec.targets import BUNDLED, resolve

HERE = Path(__file__).resolve().parent
MHA = "mha=attnspec.impl:MultiHeadAttention"


def _drawn(inv_id, spec=MHA, seed=None, **options):
    """The configurations a ci-sized search of ``inv_id`` draws: derandomized, or from ``seed``."""
    seen = []
    target = resolve(spec)

    @settings(max_examples=25, derandomize=seed is None, database=None, deadline=None)
    @given(strategy_for(BY_ID[inv_id], target, Options(**options)))
    def collect(cfg):
        seen.append(cfg)

    (collect if seed is None else hypothesis_seed(seed)(collect))()
    return seen


def test_the_simplest_configuration_is_minimal():
    cfg = simplest_config(BY_ID["oracle-float64"], resolve(MHA), Options())
    assert (cfg.num_heads, cfg.d_out, cfg.d_in, cfg.num_tokens, cfg.batch) == (1, 1, 1, 1, 1)
    assert (cfg.dtype, cfg.scale, cfg.offset, cfg.dropout, cfg.qkv_bias) == ("float32", 1.0, 0.0, 0.0, False)


def test_the_ci_profile_gives_each_invariant_its_own_budget():
    """Under ci an invariant searches its profiles.CI_EXAMPLES examples (CI_DEFAULT_EXAMPLES if unlisted);
    --max-examples sets every invariant's budget; dev and thorough give every invariant theirs."""
    target, listed, unlisted = resolve(MHA), BY_ID["oracle-float64"], BY_ID["gradient-oracle"]
    assert unlisted.id not in profiles.CI_EXAMPLES and profiles.CI_DEFAULT_EXAMPLES == 10
    ci = Options(profile="ci", only=(listed.id, unlisted.id))
    results = {r.invariant: r for r in check_target(target, ci).results}
    assert results[listed.id].budget == profiles.CI_EXAMPLES[listed.id] == 20
    assert results[listed.id].examples == 20 + len(LANDMARKS)  # and once at each real size (oracle-float64's)
    assert results[unlisted.id].budget == results[unlisted.id].examples == 10
    explicit = check_invariant(unlisted, target, Options(profile="ci", max_examples=3))
    assert explicit.budget == explicit.examples == 3
    assert budget(Options(profile="thorough"), unlisted) == 500 and budget(Options(profile="dev"), listed) == 10


def test_every_ci_budget_names_an_invariant_and_keeps_hypothesis_sequence():
    """A budget of fewer than 10 examples changes the examples Hypothesis draws (its small-example cap,
    max_examples // 10), so the detection study's indices would not hold; a typo would silently give 10."""
    assert set(profiles.CI_EXAMPLES) <= set(BY_ID)
    assert all(10 <= n <= 25 for n in (*profiles.CI_EXAMPLES.values(), profiles.CI_DEFAULT_EXAMPLES))


def test_options_without_a_profile_get_the_loaded_profiles_budget():
    """Options() (the repository's tests, benchmarks/bench.py) searches as `attnspec check --profile P` does when P
    is loaded: an invariant that the CLI checks 10 times must not be checked 25 times in its tests."""
    inv, loaded = BY_ID["gradient-oracle"], settings.get_current_profile_name()
    try:
        settings.load_profile("attnspec-ci")
        assert budget(Options(), inv) == budget(Options(profile="ci"), inv) == 10
        settings.load_profile("attnspec-thorough")
        assert budget(Options(), inv) == 500
    finally:
        settings.load_profile(loaded)


def test_a_ci_search_reaches_real_sizes_inputs_and_dtypes():
    """Under the ci budget (25 examples) a meaningful share of one invariant's examples crosses the boundaries
    real kernels branch on, with off-centre inputs and every dtype: on average over 8 searches (one search's
    counts vary: the derandomized ci search of a pair is one of them)."""
    searches = [_drawn("oracle-float64", seed=s) for s in range(8)]
    tests = {
        "T>16": lambda c: c.num_tokens > 16,
        "T>32": lambda c: c.num_tokens > 32,
        "T>256": lambda c: c.num_tokens > 256,  # oracle-float64 draws the longest regime (positions past bfloat16's 256)
        "head_dim>=8": lambda c: c.head_dim >= 8,
        "head_dim>=32 and heads>=2": lambda c: c.head_dim >= 32 and c.num_heads >= 2,
        "batch>=5 or heads>=5": lambda c: c.batch >= 5 or c.num_heads >= 5,
        "heads>16 and batch>8": lambda c: c.num_heads > 16 and c.batch > 8,  # (the "most" regime)
        "head_dim 256": lambda c: c.head_dim == 256,  # (the "widest" regime)
        "small": lambda c: c.num_tokens <= 8 and c.head_dim <= 8,
        "offset": lambda c: c.offset != 0,
    }
    mean = {name: sum(sum(map(test, seen)) for seen in searches) / len(searches) for name, test in tests.items()}
    assert mean["T>16"] >= 5 and mean["T>32"] >= 3 and mean["head_dim>=8"] >= 4, mean
    assert mean["head_dim>=32 and heads>=2"] >= 1 and mean["batch>=5 or heads>=5"] >= 3 and mean["small"] >= 3, mean
    assert mean["offset"] >= 5 and mean["T>256"] >= 1 and mean["heads>16 and batch>8"] >= 1, mean
    assert mean["head_dim 256"] >= 1, mean
    assert sum(len({c.dtype for c in seen}) for seen in searches) / len(searches) >= 3.5
    drawn = [c for seen in searches for c in seen]
    assert {c.dtype for c in drawn} == {"float32", "float64", "float16", "bfloat16"}
    assert max(c.num_tokens for c in drawn) <= 520 and max(c.head_dim for c in drawn) <= 256
    assert max(c.num_heads for c in drawn) <= 32 and max(c.batch for c in drawn) <= 16
    extreme = [c for c in drawn if c.num_tokens > 256 or c.num_heads > 16 or c.head_dim > 128]
    assert {c.dtype for c in extreme} == {"float32"}, "the extreme regimes draw oracle-float64's extreme_dtype alone"


def test_causality_and_weights_are_searched_at_large_scales():
    for inv_id in ("causal-perturbation", "weights-future-zero"):
        assert any(c.scale >= 100 for c in _drawn(inv_id)), inv_id


def test_old_repro_json_without_offset_still_parses():
    old = ('{"d_in":1,"d_out":2,"num_heads":2,"context_length":2,"num_tokens":2,"batch":1,"dropout":0.0,'
           '"qkv_bias":false,"dtype":"float32","scale":1.0,"seed":0,"device":"cpu"}')
    assert Config.from_json(old).offset == 0.0


def test_input_is_offset_plus_scale_noise_and_stays_representable_in_float16():
    cfg = Config(d_in=64, d_out=8, num_heads=1, context_length=130, num_tokens=130, batch=8, dropout=0.0,
                 qkv_bias=False, dtype="float64", scale=0.5, seed=3, offset=100.0)
    x = cfg.random_input((8, 130, 64))
    assert abs(x.mean().item() - 100.0) < 0.05 and abs(x.std().item() - 0.5) < 0.01
    half = cfg.replace(dtype="float16", scale=1e3).random_input((8, 130, 64))
    assert torch.isfinite(half).all() and half.abs().max().item() < 4 * 8  # |offset| + scale capped at 4


# --- float16 / bfloat16 support ----------------------------------------------------------------


def test_a_module_that_raises_in_float16_is_reported_unsupported_not_failed():
    """masked_fill(-1e9) on float16 scores raises in torch: float16 is not supported, the rest is checked."""
    target = resolve(f"mha={HERE / 'correct_elsewhere.py'}:LargeNegativeMaskMHA")
    (only_half,) = check_target(target, Options(dtypes=("float16",), only=("output-contract",))).results
    assert only_half.status == "not-applicable" and "float16 is not supported" in only_half.reason, only_half
    (mixed,) = check_target(target, Options(only=("oracle-float64",))).results
    assert mixed.status == "pass" and mixed.unsupported > 0 and "float16" in mixed.reason, mixed


def test_a_module_returning_nan_in_float16_fails():
    target = resolve(f"mha={HERE / 'planted.py'}:Float16MaskNaN")
    (result,) = check_target(target, Options(dtypes=("float16",), only=("output-contract",))).results
    assert result.status == "fail" and "nan" in result.reason, result


# --- --example adapted to what an invariant needs (issue 9, part 5) ------------------------------


def _example(**changes):
    base = dict(d_in=2, d_out=2, num_heads=1, context_length=4, num_tokens=4, batch=1, dropout=0.0,
                qkv_bias=False, dtype="float32", scale=1.0, seed=0)
    return Config(**{**base, **changes})


@pytest.mark.parametrize("inv_id,example,change", [
    ("train-p0-equals-eval", _example(dropout=0.5), "dropout 0.5 -> 0.0"),
    ("dropout-on-weights", _example(dropout=0.0), "dropout 0.0 -> 0.5"),
    ("dropout-unbiased", _example(dropout=0.0, dtype="float32"), "dtype 'float32' -> 'float64'"),
    ("causal-perturbation", _example(num_tokens=1, context_length=1), "num_tokens 1 -> 2"),
    ("batch-independence", _example(batch=1), "batch 1 -> 2"),
])
def test_example_is_adapted_to_the_invariant_and_the_report_says_so(inv_id, example, change):
    result = check_invariant(BY_ID[inv_id], resolve(MHA), Options(), example=example)
    assert result.status == "pass", result
    assert "--example adapted" in result.reason and change in result.reason, result.reason


def test_example_that_fits_is_not_adapted():
    result = check_invariant(BY_ID["dropout-on-weights"], resolve(MHA), Options(), example=_example(dropout=0.3))
    assert result.status == "pass" and "adapted" not in result.reason, result


# --- dropout statistics (issue 9, part 5) --------------------------------------------------------


def _tail(k, n, p):
    """2 min(P(X <= k), P(X >= k)), capped at 1, by summing every term in 40-digit decimals."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        q = decimal.Decimal(p)
        pmf = [math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(n + 1)]
        return min(1.0, float(2 * min(sum(pmf[: k + 1]), sum(pmf[k:]))))


@pytest.mark.parametrize("n,p", [(1, 0.5), (7, 0.1), (40, 0.3), (200, 0.9), (300, 0.05)])
def test_binomial_p_value_equals_the_exact_tail_sum(n, p):
    for k in range(n + 1):
        assert binomial_two_sided_p(k, n, p) == pytest.approx(_tail(k, n, p), rel=1e-6, abs=1e-300), (k, n, p)


def test_binomial_p_value_is_cheap_at_gpt2_size():
    n = 8 * 12 * 1024 * 1025 // 2  # positive causal weights of a batch of 8 at GPT-2 size
    start = time.perf_counter()
    assert binomial_two_sided_p(int(n * 0.1), n, 0.1) == pytest.approx(1.0)
    assert binomial_two_sided_p(int(n * 0.1) - 10**5, n, 0.1) < 1e-100
    assert binomial_two_sided_p(0, n, 0.1) == 0.0  # dropout that drops nothing
    assert time.perf_counter() - start < 2.0


def test_binomial_p_value_of_a_degenerate_rate():
    assert binomial_two_sided_p(0, 10, 0.0) == 1.0 and binomial_two_sided_p(1, 10, 0.0) == 0.0


class _ZeroInEvalBiasedInTrain(nn.Module):
    """Eval output exactly 0; train output 1: biased, and the eval value is 0 (no ratio to print)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.grad_in_train = []

    def forward(self, x):
        out = self.W_query(x) * 0.0
        if self.training:
            self.grad_in_train.append(torch.is_grad_enabled())
            out = out + 1.0
        return out


def test_dropout_unbiased_names_a_zero_eval_output_without_dividing_by_it():
    from attnspec.targets import ConstructorAdapter, Target

    target = Target(KINDS["mha"], "ZeroInEval", ConstructorAdapter(_ZeroInEvalBiasedInTrain, KINDS["mha"]))
    built = []
    original = target.adapter.build
    target.adapter.build = lambda cfg: built.append(original(cfg)) or built[-1]
    result = check_invariant(BY_ID["dropout-unbiased"], target, Options(), example=_example(dropout=0.5))
    assert result.status == "fail" and re.search(r"eval output -?0 ", result.reason), result
    assert "ratio" not in result.reason and "internal" not in result.reason, result
    assert built and all(enabled is False for m in built for enabled in m.grad_in_train)  # drawn under no_grad


class _UnobservableWhenSmallNaNWhenLong(nn.Module):
    """Causal attention with a hand-written softmax (weights not observable) up to 8 tokens; NaN beyond."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))

    def forward(self, x):
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        s = (q @ k.transpose(-2, -1) / k.shape[-1] ** 0.5).masked_fill(
            torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).triu(1), -math.inf)
        w = (s - s.amax(-1, keepdim=True)).exp()
        out = (w / w.sum(-1, keepdim=True)) @ v
        return out if x.shape[-2] <= 8 else out * math.nan


def test_a_large_failure_whose_small_search_finds_nothing_checkable_keeps_the_large_counterexample():
    """After a failure at a large size, a second search looks among small sizes; when none of those is
    checkable (every one n/a) that search gives up, and the large counterexample is reported."""
    from attnspec.targets import ConstructorAdapter, Target

    kind = KINDS["causal-attention"]
    target = Target(kind, "UnobservableWhenSmall", ConstructorAdapter(_UnobservableWhenSmallNaNWhenLong, kind))
    result = check_invariant(BY_ID["weights-rows-sum-to-one"], target, Options())
    assert result.status == "fail" and "nan" in result.reason, result
    assert result.counterexample["num_tokens"] > 8, result


class _CountsCallsWithoutAutograd(torch.nn.Module):
    """Correct causal attention that counts its calls made without autograd in a tensor created at the first such
    call and updated in place (a statistics counter): made under torch.inference_mode(), it can be updated only
    there. The review of the eighth session: history-independent's 32 warm calls ran under torch.no_grad() whatever
    mode the example's other calls used, and this module raised there."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        from attnspec.impl import CausalAttention

        self.attention, self.calls = CausalAttention(d_in, d_out, context_length, dropout, qkv_bias), None

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.calls = torch.zeros(()) if self.calls is None else self.calls
            self.calls += 1
        return self.attention(x)


def test_warm_calls_run_in_the_examples_autograd_mode():
    target = resolve(f"causal-attention={__file__}:_CountsCallsWithoutAutograd")
    for seed in (1, 3):  # torch.no_grad(), torch.inference_mode()
        result = check_invariant(BY_ID["history-independent"], target, Options(), example=_example(seed=seed))
        assert result.status == "pass", result


def test_landmarks_are_valid_configurations_of_every_kind_they_apply_to():
    """The real sizes (strategies.LANDMARKS) fit each kind: past 1024 tokens with more than 2**22 scores; long and
    wide together (head_dim 96, 200 tokens, batch 4, groups of 4); head_dim 64 past 512 tokens; head_dim 128 with more
    than 64 batch x heads;
    grouped K/V heads and rotary embeddings where the kind has them."""
    inv = BY_ID["oracle-float64"]
    assert inv.landmarks and not BY_ID["gradient-oracle"].landmarks
    for kind in KINDS.values():
        if not inv.applies_to(kind):
            continue
        found = landmarks(kind, simplest_config(inv, resolve(next(b for b in BUNDLED if b.startswith(f"{kind.name}="))),
                                                Options()))
        assert len(found) == len(LANDMARKS) and all(kind.invalid_reason(cfg) is None for cfg in found), kind.name
        long, both, long_wide, wide = found
        head = (lambda cfg: cfg.head_dim) if kind.head_split else (lambda cfg: cfg.d_out)  # (a wrapper's heads: d_out each)
        assert long.num_tokens > 1024 and head(both) == 96 and both.num_tokens > 128 and head(wide) == 128
        assert head(long_wide) == 64 and long_wide.num_tokens > 512
        if kind.batched and kind.multi_head:
            assert long.batch * long.num_heads * long.num_tokens**2 > 2**22 and wide.batch * wide.num_heads > 64
        assert (wide.kv_heads < wide.num_heads) == bool(kind.grouped_kv) and (wide.rope_base is not None) == bool(kind.rotary)
        assert not kind.grouped_kv or both.num_heads // both.kv_heads == 4
