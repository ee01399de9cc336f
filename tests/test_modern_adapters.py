"""The shipped Hugging Face adapters for modern attention (kind gqa: attnspec.adapters.transformers'
LlamaAttention, MistralAttention, Qwen2Attention and the SDPA ones) and the feature declaration they use.

1. each passes `attnspec check` given without KIND= (exit 0), and with KIND=gqa: no n/a; the sliding-window
   invariants do not apply to Llama and Qwen2 (their adapters declare no window) and are checked on Mistral;
2. a planted bug in each feature (tests/hf_gqa_bugs.py) is rejected by the invariant characteristic of it;
3. feature declaration: ``Adapter.features`` narrows the kind (``Kind.narrowed``), an invariant requiring a
   dropped feature does not apply, the strategy never draws it, and a bad declaration is a usage error.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings

from attnspec import Adapter, UsageError
from attnspec.cli import main
from attnspec.invariants import CATALOGUE
from attnspec.kinds import KINDS
from attnspec.runner import Options, check_target
from attnspec.strategies import configs
from attnspec.targets import resolve

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -c constraints.txt -e '.[transformers]'; CI installs it)")

ROOT = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = 5
MODERN = ["LlamaAttention", "LlamaAttentionSDPA", "MistralAttention", "MistralAttentionSDPA", "Qwen2Attention"]
WINDOWED = {"MistralAttention", "MistralAttentionSDPA"}
WINDOW_INVARIANTS = {inv.id for inv in CATALOGUE if "sliding_window" in inv.configs.get("require", ())}


def attnspec(*args, tmp_path):
    (tmp_path / "r.json").unlink(missing_ok=True)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main([*args, "--report-json", str(tmp_path / "r.json")])
    path = tmp_path / "r.json"
    return code, out.getvalue(), json.loads(path.read_text()) if path.exists() else None


# --- 1. the adapters pass -----------------------------------------------------------------------------

@pytest.mark.slow
def test_modern_adapters_pass_without_kind(tmp_path):
    targets = [f"attnspec.adapters.transformers:{name}" for name in MODERN]
    code, output, report = attnspec("check", *targets, "--profile", "ci", "--max-examples", str(MAX_EXAMPLES),
                                    tmp_path=tmp_path)
    assert code == 0, output
    for target, t in zip(targets, report["targets"]):
        assert t["target"] == target and t["kind"] == "gqa"
        status = {r["invariant"]: r["status"] for r in t["results"]}
        assert set(status.values()) == {"pass"}, (target, status)
        assert "kv-cache-decoding" in status and "grouped-query-kv-shared" in status and "rotary-embedding" in status
        assert status["padding-mask"] == status["padding-weights"] == "pass"
        windowed = target.rpartition(":")[2] in WINDOWED
        assert (WINDOW_INVARIANTS <= set(status)) if windowed else not (WINDOW_INVARIANTS & set(status)), (target, status)


def test_kind_prefix_gives_the_same_narrowed_kind(tmp_path):
    code, output, report = attnspec("check", "gqa=attnspec.adapters.transformers:LlamaAttention", "--profile", "ci",
                                    "--max-examples", "2", "--only", "rotary-embedding,kv-cache-decoding",
                                    tmp_path=tmp_path)
    assert code == 0, output
    assert {r["invariant"]: r["status"] for r in report["targets"][0]["results"]} == {
        "rotary-embedding": "pass", "kv-cache-decoding": "pass"}
    code, output, _ = attnspec("check", "gqa=attnspec.adapters.transformers:LlamaAttention", "--only", "sliding-window",
                               tmp_path=tmp_path)
    assert code == 2 and ("--only sliding-window does not apply to kind gqa (it requires the optional feature "
                          "sliding_window, which the target's adapter does not declare)") in output, output


# --- 2. planted bugs, one per feature ---------------------------------------------------------------------

BUGS = {  # name in tests/hf_gqa_bugs.py, the invariants that reject it
    "kv-heads-tiled": ("TiledKVLlamaAttention", ["grouped-query-kv-shared"]),
    "rope-wrong-halves": ("WrongHalvesLlamaAttention", ["rotary-embedding", "rotary-relative-position"]),
    "window-off-by-one": ("OffByOneWindowMistralAttention", ["sliding-window", "sliding-window-weights"]),
    "cache-position-not-advanced": ("CacheNotAdvancedLlamaAttention", ["kv-cache-decoding"]),
    "crop-keeps-last-tokens": ("CropKeepsLastLlamaAttention", ["kv-cache-decoding"]),
    "crop-keeps-position": ("CropKeepsPositionLlamaAttention", ["kv-cache-decoding"]),
    "padding-dropped": ("PaddingDroppedLlamaAttention", ["padding-mask", "padding-weights"]),
}


@pytest.mark.parametrize("name,ids", list(BUGS.values()), ids=list(BUGS))
def test_planted_bug_rejected(name, ids):
    rep = check_target(resolve(f"tests/hf_gqa_bugs.py:{name}"), Options(profile="ci", only=tuple(ids)))
    results = {r.invariant: r for r in rep.results}
    assert all(results[i].status == "fail" for i in ids), {i: (r.status, r.reason) for i, r in results.items()}


# --- 3. feature declaration -------------------------------------------------------------------------------

def test_narrowed_kind_drops_the_invariants_requiring_the_feature():
    gqa = KINDS["gqa"]
    assert gqa.features() == ("grouped_kv", "rotary", "sliding_window")
    llama = gqa.narrowed(("grouped_kv", "rotary"))
    assert llama.name == "gqa" and not llama.sliding_window and llama.rotary and llama != gqa
    applies = {inv.id for inv in CATALOGUE if inv.applies_to(llama)}
    assert applies == {inv.id for inv in CATALOGUE if inv.applies_to(gqa)} - WINDOW_INVARIANTS
    assert WINDOW_INVARIANTS and "kv-cache-decoding" in applies
    assert gqa.narrowed(gqa.features()) == gqa
    with pytest.raises(ValueError, match="no optional feature sliding_window"):
        KINDS["mha"].narrowed(("sliding_window",))


@settings(max_examples=60, deadline=None, database=None)
@given(configs(KINDS["gqa"].narrowed(("grouped_kv", "rotary"))))
def test_a_narrowed_kind_never_draws_a_window(cfg):
    assert cfg.window is None


class _NoWindow(Adapter):
    kind = "gqa"
    features = ("grouped_kv", "rotary")


class _BadFeature(_NoWindow):
    features = ("grouped_kv", "alibi")


def test_adapter_features_narrow_the_target_kind():
    assert resolve("tests/test_modern_adapters.py:_NoWindow").kind == KINDS["gqa"].narrowed(("grouped_kv", "rotary"))
    assert resolve("attnspec.adapters.transformers:MistralAttention").kind == KINDS["gqa"]
    with pytest.raises(UsageError, match="declares features .*no optional feature alibi"):
        resolve("tests/test_modern_adapters.py:_BadFeature")
