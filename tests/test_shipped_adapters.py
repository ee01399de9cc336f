"""The shipped adapters (attnspec.adapters.torch, attnspec.adapters.transformers), contract variants,
kind-less targets and constructor diagnosis, all through the public paths (CLI, resolve, check_target).

1. every shipped adapter passes `attnspec check` given without KIND= (the transformers ones need
   transformers, which CI installs: `.ci/run` installs the `transformers` extra);
2. planted bugs in library style are rejected through them (tests/hf_bugs.py, and torch ones here);
3. a variant changes exactly what its record says: a one-bias-flag module fails qkv-bias by default and
   passes with out-proj-no-bias; an erf-GELU block fails by default and passes with gelu-erf, a tanh
   block fails under gelu-erf; the report (terminal, JSON, Markdown, repro line) names the variant;
4. targets: KIND= may be left out only for an adapter that declares its kind; a constructor that cannot
   take the kind's arguments is a usage error (exit 2) showing both signatures, not a failing module.
"""

import contextlib
import html
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from attnspec import Adapter, UsageError
from attnspec.adapters.base import rows
from attnspec.cli import main
from attnspec.adapters.torch import CausalEncoderLayer, TransformerEncoderLayer, TransformerEncoderLayerErf
from attnspec.impl import MultiHeadAttention
from attnspec.invariants import CATALOGUE
from attnspec.kinds import KINDS
from attnspec.runner import Options, check_target
from attnspec.targets import resolve
from attnspec.variants import VARIANTS, contract

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests/test_shipped_adapters.py"
MAX_EXAMPLES = 5  # per invariant in the full runs: every path exercised, small enough for the suite budget
TORCH_ADAPTERS = ["MultiheadAttention", "MultiheadAttentionOneBias", "SDPA", "SDPAMHA", "TransformerEncoderLayer",
                  "TransformerEncoderLayerErf"]
HF_ADAPTERS = ["GPT2Attention", "GPT2AttentionSDPA", "GPT2Block", "GPT2BlockSDPA"]
WEIGHT_LEVEL = {inv.id for inv in CATALOGUE if inv.observes in ("weights", "weights+params")}


def has_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_transformers = pytest.mark.skipif(not has_transformers(), reason="transformers is not installed "
                                        "(pip install -c constraints.txt -e '.[transformers]'; CI installs it)")


def attnspec(*args, tmp_path=None):
    """`attnspec ...` run in this process from the repo root (tests/test_cli.py runs the real entry points):
    (exit code, stdout + stderr, JSON report or None, Markdown report or None)."""
    extra = [] if tmp_path is None else ["--report-json", str(tmp_path / "r.json"), "--report-md", str(tmp_path / "r.md")]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main([*args, *extra])
    report = md = None
    if tmp_path is not None and (tmp_path / "r.json").exists():
        report, md = json.loads((tmp_path / "r.json").read_text()), (tmp_path / "r.md").read_text()
    return code, out.getvalue(), report, md


def statuses(target_report):
    return {r["invariant"]: r["status"] for r in target_report["results"]}


def check(spec, *ids, variants=(), max_examples=MAX_EXAMPLES):
    """{id: Result} of checking ``spec`` (resolved as the CLI does) on ``ids`` (all when none)."""
    rep = check_target(resolve(spec, variants), Options(profile="ci", max_examples=max_examples, only=ids))
    return {r.invariant: r for r in rep.results}


def assert_passes(results, allowed_na=()):
    bad = {i: (r.status, r.reason) for i, r in results.items()
           if r.status == "fail" or (r.status == "not-applicable" and i not in allowed_na)}
    assert not bad, bad


def assert_rejected(results, *ids):
    assert all(results[i].status == "fail" for i in ids), {i: (r.status, r.reason) for i, r in results.items()}


# --- 1. the shipped adapters pass, given without KIND= --------------------------------------------------

def _assert_all_pass(targets, tmp_path, fused):
    code, output, report, md = attnspec("check", *targets, "--profile", "ci", "--max-examples", str(MAX_EXAMPLES),
                                        tmp_path=tmp_path)
    assert code == 0, output
    for target, t in zip(targets, report["targets"]):
        assert t["target"] == target and t["kind"] == getattr(resolve(target).adapter, "kind")
        s = statuses(t)
        assert "fail" not in s.values(), (target, s)
        # Parameter-level and structural invariants apply to every shipped adapter; the weight-level ones
        # are n/a only where attention is fused (SDPA, nn.MultiheadAttention), never failing.
        na = {i for i, v in s.items() if v == "not-applicable"}
        assert na <= (WEIGHT_LEVEL if fused(target) else set()), (target, na)
    return output, report, md


@pytest.mark.slow
def test_torch_adapters_pass_without_kind(tmp_path):
    targets = [f"attnspec.adapters.torch:{name}" for name in TORCH_ADAPTERS]
    output, report, md = _assert_all_pass(targets, tmp_path, fused=lambda t: True)
    variants = {t["target"].rpartition(":")[2]: t["variants"] for t in report["targets"]}
    assert variants == {"MultiheadAttention": [], "MultiheadAttentionOneBias": ["out-proj-no-bias"], "SDPA": [], "SDPAMHA": [],
                        "TransformerEncoderLayer": [], "TransformerEncoderLayerErf": ["gelu-erf"]}
    assert "TransformerEncoderLayerErf  (TransformerEncoderLayerErf) variants: gelu-erf" in output
    assert ("transformer-block=attnspec.adapters.torch:TransformerEncoderLayerErf</code> checked against contract "
            "variants: gelu-erf") in html.unescape(md)


@needs_transformers
@pytest.mark.slow
def test_transformers_adapters_pass_without_kind(tmp_path):
    targets = [f"attnspec.adapters.transformers:{name}" for name in HF_ADAPTERS]
    _, report, _ = _assert_all_pass(targets, tmp_path, fused=lambda t: t.endswith("SDPA"))
    eager = [t for t in report["targets"] if not t["target"].endswith("SDPA")]
    assert all(statuses(t)[i] == "pass" for t in eager for i in WEIGHT_LEVEL if i in statuses(t))


def test_examples_keep_their_names():
    """examples/adapters.py re-exports the moved adapters under their old names."""
    from attnspec.adapters import torch as shipped

    examples = resolve("examples/adapters.py:TorchMultiheadAttention")
    assert isinstance(examples.adapter, shipped.MultiheadAttention) and examples.kind.name == "mha"
    assert isinstance(resolve("examples/adapters.py:SDPAAttention").adapter, shipped.SDPAMHA)


def test_encoder_layer_is_configured_to_the_contract():
    layer = CausalEncoderLayer(8, 2, 4, 0.1, qkv_bias=False).layer
    assert layer.linear1.out_features == 32 and layer.norm1.eps == layer.norm2.eps == 1e-5
    assert layer.norm_first and layer.self_attn.batch_first and layer.self_attn.in_proj_bias is None
    assert layer.self_attn.out_proj.bias is not None and isinstance(layer.dropout, nn.Identity)


# --- 2. planted bugs through the shipped adapters -------------------------------------------------------

class _PostNormEncoderLayer(CausalEncoderLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer.norm_first = False  # post-LN: x = LN(x + att(x)), the original Transformer


class PostNormEncoderLayer(TransformerEncoderLayer):
    def build(self, cfg):
        return _PostNormEncoderLayer(cfg.d_in, cfg.num_heads, cfg.context_length, cfg.dropout, cfg.qkv_bias)


class _NoMaskEncoderLayer(CausalEncoderLayer):
    def forward(self, x):
        return self.layer(x)  # forgot src_mask / is_causal


class NoMaskEncoderLayer(TransformerEncoderLayer):
    def build(self, cfg):
        return _NoMaskEncoderLayer(cfg.d_in, cfg.num_heads, cfg.context_length, cfg.dropout, cfg.qkv_bias)


class ErfUndeclared(TransformerEncoderLayerErf):
    variants = ()  # torch's erf "gelu" checked against the seed's tanh contract


TORCH_BUGS = {
    "post-norm-encoder-layer": (f"{HERE}:PostNormEncoderLayer", ["layernorm-pre-sublayer"]),
    "no-mask-encoder-layer": (f"{HERE}:NoMaskEncoderLayer", ["causal-perturbation"]),
    "erf-encoder-layer": (f"{HERE}:ErfUndeclared", ["feedforward-gelu-tanh", "oracle-float64"]),
}

HF_BUGS = {  # the invariant that rejects each fastest (others reject most of them too, more slowly)
    "eager-ignores-mask": ("NoMaskGPT2Attention", ["causal-perturbation"]),
    "sdpa-not-causal": ("NotCausalGPT2AttentionSDPA", ["causal-perturbation"]),
    "unscaled": ("UnscaledGPT2Attention", ["oracle-float64"]),
    "unscaled-sdpa": ("UnscaledGPT2AttentionSDPA", ["oracle-float64"]),
    "inverse-layer-idx-scale": ("InverseLayerIdxGPT2Attention", ["oracle-float64"]),
    "c_attn-split-k-q-v": ("SwappedSplitGPT2Attention", ["oracle-float64"]),
    "c_attn-split-k-q-v-block": ("SwappedSplitGPT2Block", ["scaling-sqrt-head-dim"]),
    "post-ln-block": ("PostLNGPT2Block", ["layernorm-pre-sublayer"]),
    "erf-gelu-block": ("ErfGELUGPT2Block", ["feedforward-gelu-tanh"]),
}


@pytest.mark.parametrize("spec,ids", list(TORCH_BUGS.values()), ids=list(TORCH_BUGS))
def test_torch_bug_rejected(spec, ids):
    assert_rejected(check(spec, *ids), *ids)


@needs_transformers
@pytest.mark.parametrize("name,ids", list(HF_BUGS.values()), ids=list(HF_BUGS))
def test_transformers_bug_rejected(name, ids):
    # 15 examples: a scaling or q/k-order bug needs head_dim > 1, which a 5-example search may not draw
    assert_rejected(check(f"tests/hf_bugs.py:{name}", *ids, max_examples=15), *ids)


# --- 3. contract variants --------------------------------------------------------------------------------

class OneBiasFlagAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one ``bias`` flag for c_attn and c_proj, causal -inf mask,
    dropout on the weights (attn_dropout) and no residual dropout here (resid_pdrop = 0)."""

    def __init__(self, n_embd, n_head, block_size, dropout, bias):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k, q, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, q, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class OneBiasFlag(Adapter):
    kind = "mha"

    def adjust(self, cfg):
        return cfg.replace(d_in=cfg.d_out)

    def build(self, cfg):
        return OneBiasFlagAttention(cfg.d_out, cfg.num_heads, cfg.context_length, cfg.dropout, cfg.qkv_bias)

    def projections(self, module):
        parts = {n: (rows(module.c_attn.weight, i, 3), rows(module.c_attn.bias, i, 3))
                 for i, n in enumerate(("query", "key", "value"))}
        return {**parts, "out": (module.c_proj.weight, module.c_proj.bias)}


class OneBiasFlagDeclared(OneBiasFlag):
    variants = ("out-proj-no-bias",)


def test_variant_table_is_the_contract():
    assert contract() == contract(()) and contract().gelu == "tanh" and contract().out_proj_bias == "always"
    for v in VARIANTS.values():
        changed = contract([v.name])
        assert {k: getattr(changed, k) for k in v.changes} == v.changes != {k: getattr(contract(), k) for k in v.changes}
        assert set(v.invariants) <= {inv.id for inv in CATALOGUE}
    with pytest.raises(UsageError, match="unknown contract variant 'nope'.*out-proj-no-bias"):
        contract(["nope"])


def test_one_bias_flag_fails_by_default_and_passes_with_the_variant():
    spec = f"{HERE}:OneBiasFlag"
    default = check(spec, "qkv-bias")
    assert_rejected(default, "qkv-bias")
    assert "qkv_bias=False but the output projection has no bias" in default["qkv-bias"].reason
    assert "--variant out-proj-no-bias" in default["qkv-bias"].reason
    assert_passes(check(spec, variants=("out-proj-no-bias",)))  # and every other invariant holds
    assert_passes(check(f"{HERE}:OneBiasFlagDeclared", "qkv-bias", "oracle-float64"))


def test_out_proj_no_bias_rejects_a_bias_without_qkv_bias():
    """Under the variant the rule is 'iff': the seed's module (out_proj always biased) fails it."""
    results = check("mha=attnspec.impl:MultiHeadAttention", "qkv-bias", variants=("out-proj-no-bias",))
    assert_rejected(results, "qkv-bias")
    assert "has a bias (variant out-proj-no-bias" in results["qkv-bias"].reason


def test_gelu_variant_decides_the_feed_forward():
    ids = ("feedforward-gelu-tanh", "oracle-float64")
    erf = f"{HERE}:ErfUndeclared"
    assert_rejected(check(erf, *ids), *ids)
    assert_passes(check(erf, *ids, variants=("gelu-erf",)))
    tanh = "transformer-block=attnspec.impl:TransformerBlock"
    results = check(tanh, *ids, variants=("gelu-erf",))
    assert_rejected(results, *ids)
    assert "gelu_erf" in results["feedforward-gelu-tanh"].reason
    assert_rejected(check("attnspec.adapters.torch:TransformerEncoderLayer", *ids, variants=("gelu-erf",)), *ids)


@needs_transformers
def test_gpt2_block_erf_passes_with_its_declared_variant():
    assert_passes(check("tests/hf_bugs.py:ErfGELUGPT2BlockVariant", "feedforward-gelu-tanh", "oracle-float64"))


def test_cli_variant_is_reported_and_in_the_repro(tmp_path):
    spec = "transformer-block=attnspec.impl:TransformerBlock"
    code, output, report, md = attnspec("check", spec, "--variant", "gelu-erf", "--only", "feedforward-gelu-tanh",
                                        "--profile", "ci", tmp_path=tmp_path)
    assert code == 1, output
    assert "(ConstructorAdapter) variants: gelu-erf" in output
    (t,) = report["targets"]
    assert t["variants"] == ["gelu-erf"] and "checked against contract variants: gelu-erf" in md
    (result,) = t["results"]
    assert " --variant gelu-erf " in result["repro"]
    argv = shlex.split(result["repro"])
    code, output, _, _ = attnspec(*argv[1:])
    assert code == 1 and "gelu_erf" in output, output


@pytest.mark.parametrize("args,pattern", [
    (["--variant", "nope"], r"unknown contract variant 'nope': expected one of out-proj-no-bias, gelu-erf"),
    (["tests/bad_targets/adapter_without_kind.py:UnknownVariant"], r"unknown contract variant 'no-such-variant'"),
], ids=["cli", "declared"])
def test_unknown_variant_is_a_usage_error(args, pattern):
    code, output, _, _ = attnspec("check", "attnspec.adapters.torch:SDPA", *args, "--profile", "ci")
    assert code == 2 and re.search(pattern, output), output


def test_list_variants():
    code, output, _, _ = attnspec("list", "--variants")
    assert code == 0 and all(name in output for name in VARIANTS), output


# --- 4. kind-less targets and constructor diagnosis ------------------------------------------------------

def test_kind_comes_from_the_adapter_or_kind_prefix():
    assert resolve("attnspec.adapters.torch:SDPAMHA").kind is KINDS["mha"]
    assert resolve("mha=attnspec.adapters.torch:SDPAMHA").kind is KINDS["mha"]
    assert resolve("attnspec.adapters.torch:SDPA").kind == KINDS["gqa"].narrowed(("grouped_kv",))
    assert resolve(f"{HERE}:OneBiasFlag").kind is KINDS["mha"]  # path/to/file.py:Attr
    assert resolve(f"transformer-block={HERE}:ErfUndeclared").kind is KINDS["transformer-block"]


USAGE = {
    "class-without-kind": ("attnspec.impl:MultiHeadAttention", r"has no KIND=: a class or factory needs one, e\.g\. "
                           r"mha=attnspec\.impl:MultiHeadAttention"),
    "adapter-without-kind": ("tests/bad_targets/adapter_without_kind.py:NoKind", r"declares no kind: write KIND="),
    "adapter-unknown-kind": ("tests/bad_targets/adapter_without_kind.py:UnknownKind", r"unknown kind 'attention'"),
    "kind-mismatch": ("causal-attention=attnspec.adapters.torch:SDPAMHA", r"written for kind 'mha', not 'causal-attention'"),
    "keyword-only": ("mha=tests/bad_targets/keyword_only.py:MHA", r"expected MHA\(d_in, d_out, context_length, dropout, "
                     r"num_heads, qkv_bias=False\), the target is MHA\(\*, d_in.*do not bind.*adapter"),
    "config-object": ("transformer-block=tests/bad_targets/config_object.py:Block",
                      r"expected Block\(cfg: dict with emb_dim.*the target is Block\(config\).*AttributeError: "
                      r"'dict' object has no attribute 'n_embd' for each of \d+ configurations tried.*README"),
    "other-keys": ("transformer-block=tests/bad_targets/other_keys.py:Block", r"KeyError: 'd_model' for each of"),
}


@pytest.mark.parametrize("spec,pattern", list(USAGE.values()), ids=list(USAGE))
def test_target_usage_error(spec, pattern):
    with pytest.raises(UsageError, match=pattern):
        resolve(spec)


def test_constructor_usage_error_exits_2_before_checking():
    code, output, _, _ = attnspec("check", "mha=attnspec.impl:MultiHeadAttention",
                                  "transformer-block=tests/bad_targets/config_object.py:Block", "--profile", "ci")
    assert code == 2 and "attnspec: error: transformer-block=tests/bad_targets/config_object.py:Block: the constructor " \
                         "cannot be called with the transformer-block kind's arguments" in output, output
    assert "Traceback" not in output and "[1/" not in output, output


def test_constructor_failing_for_some_configurations_is_the_modules_violation():
    """TypeError only for qkv_bias=True: the constructor takes the kind's arguments; the check reports it."""
    results = check("mha=tests/bad_targets/typeerror_with_bias.py:MHA", "output-contract", "qkv-bias")
    failed = [r for r in results.values() if r.status == "fail"]
    assert failed and "the constructor raised TypeError: qkv_bias is not supported yet" in failed[0].reason


def test_missing_transformers_is_a_usage_error(tmp_path):
    """Importing attnspec needs no transformers; the transformers adapters say how to install it."""
    blocker = tmp_path / "transformers"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('transformers is blocked in this test')\n")
    code = ("import sys; sys.path.insert(0, %r); import attnspec, attnspec.adapters, attnspec.adapters.torch\n"
            "from attnspec.cli import main; sys.exit(main(['check', 'attnspec.adapters.transformers:GPT2Attention']))"
            % str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"needs Hugging Face transformers.*pip install -c constraints.txt 'attnspec\[transformers\]'",
                     proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
