"""The adapter examples in examples/adapters.py: each passes `attnspec check` through the CLI, with the
statuses its design implies, and a bug planted inside each is caught.

The planted-bug adapters below subclass the examples and are resolved from this file by path, the way
a user points attnspec at an adapter in their own file."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

from attnspec.invariants import CATALOGUE
from attnspec.kinds import KINDS
from attnspec.runner import Options, check_target
from attnspec.targets import resolve

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "examples" / "adapters.py"
MAX_EXAMPLES = 10  # per invariant in the CLI runs: enough to exercise every path, small enough for CI


def _load_examples():
    name = "attnspec_examples_adapters"
    if name not in sys.modules:
        loader_spec = importlib.util.spec_from_file_location(name, ADAPTERS)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    return sys.modules[name]


examples = _load_examples()

MHA = KINDS["mha"]
WEIGHT_LEVEL = {inv.id for inv in CATALOGUE if inv.observes in ("weights", "weights+params") and inv.applies_to(MHA)}
PARAM_LEVEL = {"oracle-float64", "head-split-equivalence", "qkv-bias", "weight-transfer"}
ALL_MHA = {inv.id for inv in CATALOGUE if inv.applies_to(MHA)}


def cli_check(adapter, tmp_path):
    """`attnspec check mha=examples/adapters.py:<adapter>` from the repo root: (exit code, {id: result}, output)."""
    report = tmp_path / f"{adapter}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "attnspec", "check", f"mha=examples/adapters.py:{adapter}", "--report-json", str(report),
         "--profile", "ci", "--max-examples", str(MAX_EXAMPLES),
         "--expectations", "examples/attnspec-expectations.txt"],  # the adapters' documented n/a's
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert report.exists(), output
    (target,) = json.loads(report.read_text())["targets"]
    return proc.returncode, {r["invariant"]: r for r in target["results"]}, output


def statuses(results, ids):
    return {i: results[i]["status"] for i in sorted(ids)}


def test_weight_and_param_sets_are_what_the_tests_assume():
    assert WEIGHT_LEVEL, "no weight-level invariant applies to mha"
    assert PARAM_LEVEL <= ALL_MHA and not PARAM_LEVEL & WEIGHT_LEVEL


def test_torch_multihead_attention_passes(tmp_path):
    code, results, output = cli_check("TorchMultiheadAttention", tmp_path)
    assert code == 0, output
    assert set(results) == ALL_MHA
    assert "fail" not in {r["status"] for r in results.values()}, output
    assert statuses(results, PARAM_LEVEL) == dict.fromkeys(sorted(PARAM_LEVEL), "pass"), output
    # the probe records F.multi_head_attention_forward's weights (issue 10): every invariant applies
    assert statuses(results, ALL_MHA) == dict.fromkeys(sorted(ALL_MHA), "pass"), output
    # adjust() draws d_in == d_out only, so every example is checked: none skipped
    contract = results["output-contract"]
    assert contract["unsupported"] == 0 and contract["examples"] > 5, contract


def test_sdpa_attention_passes_at_the_weight_level(tmp_path):
    code, results, output = cli_check("SDPAAttention", tmp_path)
    assert code == 0, output
    assert set(results) == ALL_MHA
    # the probe computes the weights scaled_dot_product_attention's arguments determine (issue 10)
    assert statuses(results, ALL_MHA) == dict.fromkeys(sorted(ALL_MHA), "pass"), output
    for inv_id in WEIGHT_LEVEL:
        assert results[inv_id]["examples"] > 0, results[inv_id]


def test_combined_qkv_passes_everything(tmp_path):
    code, results, output = cli_check("CombinedQKV", tmp_path)
    assert code == 0, output
    assert statuses(results, ALL_MHA) == dict.fromkeys(sorted(ALL_MHA), "pass"), output


# --- planted bugs ---------------------------------------------------------------------------------

class MaskTransposedTorchMHA(examples.TorchMultiheadAttention):
    """Bug: the bool mask passed to nn.MultiheadAttention is transposed (blocks the past, admits the future)."""

    def build(self, cfg):
        module = super().build(cfg)
        module.mask = module.mask.T.contiguous()
        return module


class NonCausalSDPAModule(examples.SDPAMultiHeadAttention):
    """Bug: scaled_dot_product_attention without is_causal=True."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class NonCausalSDPA(examples.SDPAAttention):
    def build(self, cfg):
        return NonCausalSDPAModule(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                                   qkv_bias=cfg.qkv_bias)


class SwappedQKCombinedQKV(examples.CombinedQKV):
    """Bug in the adapter: projections() reports the key slice as the query and vice versa."""

    def projections(self, module):
        parts = super().projections(module)
        parts["query"], parts["key"] = parts["key"], parts["query"]
        return parts


class SwappedQKModule(examples.CombinedQKVAttention):
    """Bug in the module: qkv(x) split as k, q, v while the layout (and the adapter) say q, k, v."""

    def forward(self, x):
        b, n, _ = x.shape
        k, q, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)).masked_fill(self.mask[:n, :n], float("-inf"))
        weights = self.dropout(scores.div(self.head_dim**0.5).softmax(dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.d_out))


class SwappedQKForwardCombinedQKV(examples.CombinedQKV):
    def build(self, cfg):
        return SwappedQKModule(cfg.d_in, cfg.d_out, cfg.context_length, cfg.dropout, cfg.num_heads,
                               qkv_bias=cfg.qkv_bias)


@pytest.mark.parametrize("adapter,invariant,message", [
    ("MaskTransposedTorchMHA", "causal-perturbation", "after changing tokens"),
    ("NonCausalSDPA", "causal-perturbation", "after changing tokens"),
    ("SwappedQKCombinedQKV", "oracle-float64", "vs float64 oracle"),
    ("SwappedQKForwardCombinedQKV", "oracle-float64", "vs float64 oracle"),
])
def test_planted_bug_is_caught(adapter, invariant, message):
    target = resolve(f"mha={Path(__file__).resolve()}:{adapter}")
    (result,) = check_target(target, Options(only=(invariant,))).results
    assert result.status == "fail" and message in result.reason, result
    assert result.counterexample and result.repro.startswith("attnspec check") and f"--only {invariant}" in result.repro
