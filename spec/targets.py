"""Targets: resolve ``[KIND=]TARGET`` into something that builds modules, and adapters.

TARGET is ``package.module:Attr`` or ``path/to/file.py:Attr``. Attr is a class or factory with the
kind's constructor signature, or an ``Adapter`` (a subclass, an instance, or any object with a
``build(cfg)`` method) for modules whose constructor or parameter layout differs from the seed's.
An adapter that declares its ``kind`` may be given without ``KIND=``; ready-made adapters for torch
and Hugging Face modules are in ``attnspec.adapters``.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from attnspec.case import CALL_TIME_LIMIT_S, _time_limit, _Timeout, describe
from attnspec.errors import Unsupported, UsageError, internal_error
from attnspec.kinds import KINDS, Config, Kind
from attnspec.variants import check_names


class Adapter:
    """How to check a module whose constructor or layout is not the seed's.

    Override ``build``; raise ``Unsupported(reason)`` for configurations the module does not support
    (they are skipped and counted, never silently), or override ``adjust`` to draw only supported ones. Override ``projections`` to say where the
    query/key/value/output projections live, so parameter-level invariants apply; returning None
    makes them not applicable."""

    kind = None  # the kind this adapter is written for: then the target may be given without KIND=
    variants = ()  # contract variants the module is checked against (names in spec.variants.VARIANTS)
    # The kind's optional features (spec.kinds.OPTIONAL: "grouped_kv", "rotary", "sliding_window") the module
    # has; None: all of them. A feature left out is never drawn, and the invariants requiring it do not apply
    # (a Llama attention has no sliding window: features = ("grouped_kv", "rotary")).
    features = None

    def build(self, cfg):
        raise NotImplementedError

    def adjust(self, cfg):
        """Map each drawn configuration onto one the module supports (e.g. ``cfg.replace(d_in=cfg.d_out)``),
        so every example is checked; the result must still be valid for the kind. Default: as drawn."""
        return cfg

    def projections(self, module):
        """Per kind (each projection a ``(weight (out, in), bias or None)`` pair, nn.Linear's layout):

        * self-attention, causal-attention, mha: ``{"query", "key", "value"[, "out"]}``
        * mha-wrapper: a list of such dicts, one per head, in output order
        * transformer-block: ``{"att": <mha dict>, "norm1": (scale, shift), "norm2": (scale, shift),
          "ff": [(W1, b1), (W2, b2)]}``"""
        return seed_projections(module)

    def heads(self, module):
        """mha-wrapper only: the head modules whose outputs are concatenated, or None."""
        heads = getattr(module, "heads", None)
        return list(heads) if isinstance(heads, (nn.ModuleList, list, tuple)) else None

    def sublayers(self, module):
        """transformer-block only: ``(attention, feed_forward)`` submodules, or None."""
        att, ff = (_named(module, NAMES[n], nn.Module) for n in ("att", "ff"))
        return (att, ff) if att is not None and ff is not None else None


# The seed's names first, then the common alternatives (nanoGPT, Hugging Face, torchtune, x-transformers, llama).
NAMES = {
    "query": ("W_query", "q_proj", "query", "W_q", "to_q", "wq"),
    "key": ("W_key", "k_proj", "key", "W_k", "to_k", "wk"),
    "value": ("W_value", "v_proj", "value", "W_v", "to_v", "wv"),
    "qkv": ("c_attn", "qkv", "Wqkv", "qkv_proj", "to_qkv"),  # one projection to [q | k | v], in that order
    "out": ("out_proj", "o_proj", "output_proj", "to_out", "c_proj", "proj", "wo"),
    # the output projection's bias kept as a parameter of its own (fused bias-add kernels, Megatron-style code)
    "out_bias": ("out_bias", "out_proj_bias", "o_bias", "proj_bias", "output_bias", "bias_out"),
    "att": ("att", "attn", "attention", "self_attn"),
    "ff": ("ff", "mlp", "ffn", "feed_forward"),
    "norm1": ("norm1", "ln_1", "ln1"),
    "norm2": ("norm2", "ln_2", "ln2"),
}


def _first(*candidates):
    return next((c for c in candidates if c is not None), None)


def _named(module, names, types):
    """The first attribute of ``module`` among ``names`` that is an instance of ``types``."""
    for name in names:
        obj = getattr(module, name, None)
        if isinstance(obj, types):
            return obj
    return None


def _is_conv1d(obj):
    """Hugging Face's GPT-2 ``Conv1D``: y = x W + b with W stored (in, out), i.e. nn.Linear's transpose."""
    return type(obj).__name__ == "Conv1D" and isinstance(getattr(obj, "weight", None), nn.Parameter) and obj.weight.dim() == 2


def _leaf(obj):
    """(weight (out, in), bias or None) of an nn.Linear or a Conv1D (transposed: a view, writes go through)."""
    if isinstance(obj, nn.Linear):
        return (obj.weight, obj.bias)
    if _is_conv1d(obj):
        return (obj.weight.detach().T, None if obj.bias is None else obj.bias.detach())
    return None


def _linear(obj, transpose_parameter=False):
    """A projection: nn.Linear, Conv1D, the first of those in a Sequential or ModuleList (``to_out =
    Sequential(Linear, Dropout)``), or (seed names only) a 2-D Parameter stored (d_in, d_out) like SelfAttention_v1's."""
    if isinstance(obj, (nn.Sequential, nn.ModuleList)):
        return next((p for p in map(_leaf, obj.children()) if p is not None), None)
    if isinstance(obj, nn.Parameter) and obj.dim() == 2 and transpose_parameter:
        return (obj.T, None)  # SelfAttention_v1 stores (d_in, d_out); nn.Linear's layout is (out, in)
    return _leaf(obj)


def _split3(weight, bias):
    """q, k, v = rows [0, d), [d, 2d), [2d, 3d) of a fused (3d, in) weight: views sharing its storage."""
    if weight is None or weight.dim() != 2 or weight.shape[0] % 3:
        return None
    d = weight.shape[0] // 3
    rows = [slice(i * d, (i + 1) * d) for i in range(3)]
    return {n: (weight.detach()[r], None if bias is None else bias.detach()[r])
            for n, r in zip(("query", "key", "value"), rows)}


def _separate(module):
    """One projection per name (NAMES); a 2-D nn.Parameter only under the seed's own names."""
    found, names = {}, []
    for n in ("query", "key", "value"):
        seed = getattr(module, NAMES[n][0], None)
        if isinstance(seed, nn.Parameter):
            found[n], name = _linear(seed, True), NAMES[n][0]
        else:
            name = next((a for a in NAMES[n] if _linear(getattr(module, a, None)) is not None), None)
            found[n] = _linear(getattr(module, name, None)) if name else None
        if found[n] is None:
            return None
        names.append(name)
    return found, "/".join(names)


def _fused(module):
    """One nn.Linear or Conv1D projecting to [q | k | v] (nanoGPT and HF GPT-2 ``c_attn``, ``qkv``, ``Wqkv``)."""
    for name in NAMES["qkv"]:
        obj = getattr(module, name, None)
        parts = _split3(*_linear(obj)) if _linear(obj) is not None else None
        if parts is not None:
            return parts, f"{name} ({'Conv1D, (in, out) transposed' if _is_conv1d(obj) else type(obj).__name__}) split q|k|v"
    return None


def _in_proj(module):
    """nn.MultiheadAttention's ``in_proj_weight`` (3d, d) and ``in_proj_bias``, split q|k|v."""
    weight = getattr(module, "in_proj_weight", None)
    parts = _split3(weight, getattr(module, "in_proj_bias", None)) if isinstance(weight, nn.Parameter) else None
    return None if parts is None else (parts, "in_proj_weight split q|k|v")


# Where the query/key/value projections of an attention module live, tried in order. Each finder
# returns ({"query", "key", "value"}: (weight (out, in), bias)) views and a description, or None.
LAYOUTS = (
    ("separate", _separate),  # W_query/W_key/W_value, q_proj/k_proj/v_proj, to_q/to_k/to_v, wq/wk/wv
    ("fused qkv", _fused),  # c_attn (nn.Linear or HF Conv1D), qkv, Wqkv
    ("in_proj", _in_proj),  # nn.MultiheadAttention
)


def find_projections(module):
    """(parts, description) of the projections found by layout (LAYOUTS, NAMES), or (None, "")."""
    for layout, finder in LAYOUTS:
        found = finder(module)
        if found is not None:
            parts, where = found
            out_name = next((a for a in NAMES["out"] if _linear(getattr(module, a, None)) is not None), None)
            if out_name is None:
                return parts, f"{layout}: {where}, no output projection"
            weight, bias = _linear(getattr(module, out_name))
            bias_name = None if bias is not None else next(
                (a for a in NAMES["out_bias"] if isinstance(getattr(module, a, None), nn.Parameter)
                 and getattr(module, a).shape == weight.shape[:1]), None)
            if bias_name is not None:
                bias, out_name = getattr(module, bias_name), f"{out_name} (bias: {bias_name})"
            return {**parts, "out": (weight, bias)}, f"{layout}: {where} + {out_name}"
    if isinstance(getattr(module, "heads", None), (nn.ModuleList, list)):
        heads = [find_projections(h) for h in module.heads]
        if not heads or any(parts is None for parts, _ in heads):
            return None, ""
        return [parts for parts, _ in heads], f"{len(heads)} heads, each {heads[0][1]}"
    att, ff = (_named(module, NAMES[n], nn.Module) for n in ("att", "ff"))
    if att is not None and ff is not None:
        att, where = find_projections(att)
        linears = [p for p in map(_leaf, ff.modules()) if p is not None]
        norms = [_norm(_named(module, NAMES[n], nn.Module)) for n in ("norm1", "norm2")]
        if isinstance(att, dict) and "out" in att and len(linears) == 2 and None in norms:
            which = " and ".join(n for n, norm in zip(("norm1", "norm2"), norms) if norm is None)
            verb = "has" if norms.count(None) == 1 else "have"
            return None, f"block: {which} {verb} no scale and shift (weight and bias) parameters, as GPT-2's LayerNorm has"
        if not isinstance(att, dict) or "out" not in att or len(linears) != 2 or None in norms:
            return None, ""
        return {"att": att, "norm1": norms[0], "norm2": norms[1], "ff": linears}, f"block; attention {where}"
    return None, ""


def _per_head_split(weight, bias, num_heads):
    """q, k, v of a fused (3d, in) weight laid out per head, [q_h | k_h | v_h] for each head h in turn (GPT-NeoX's
    and Megatron's ``query_key_value``): row block h of q is rows [3h hd, (3h+1) hd), and so on. Copies."""
    if weight is None or weight.dim() != 2 or weight.shape[0] % (3 * num_heads):
        return None
    hd = weight.shape[0] // (3 * num_heads)
    w = weight.detach().reshape(num_heads, 3, hd, -1)
    b = None if bias is None else bias.detach().reshape(num_heads, 3, hd)
    return {n: (w[:, i].reshape(num_heads * hd, -1), None if b is None else b[:, i].reshape(-1))
            for i, n in enumerate(("query", "key", "value"))}


def _attention_readings(module, parts, num_heads):
    """Other readings of an attention's q/k/v parameters, each as ``parts`` with its q/k/v replaced: a fused
    projection per head ([q_h | k_h | v_h], ``_per_head_split``) as well as [Q | K | V]; bare 2-D Parameters under the
    seed's names in nn.Linear's (out, in) layout as well as SelfAttention_v1's (in, out)."""
    found = []
    for name in NAMES["qkv"]:
        leaf = _linear(getattr(module, name, None))
        if leaf is not None and _split3(*leaf) is not None:
            split = _per_head_split(*leaf, num_heads) if num_heads > 1 else None
            found += [split] if split is not None else []
            break
    seed = [getattr(module, NAMES[n][0], None) for n in ("query", "key", "value")]
    if all(isinstance(p, nn.Parameter) and p.dim() == 2 for p in seed):
        found.append({n: (p, None) for n, p in zip(("query", "key", "value"), seed)})
    return [{**parts, **reading} for reading in found]


def readings(module, parts, num_heads):
    """The plausible readings of a module's parameters other than ``parts`` (the default, ``find_projections``):
    where the layout alone cannot tell, the module's own forward decides between them (``Case.projections``). A
    block's feed-forward Linears are also read in the other order (registered output first)."""
    if not isinstance(parts, dict):
        return []
    if "att" not in parts:
        return _attention_readings(module, parts, num_heads)
    att = _named(module, NAMES["att"], nn.Module)
    atts = [parts["att"], *(_attention_readings(att, parts["att"], num_heads) if att is not None else [])]
    emb = parts["norm1"][0].shape[0]
    reversed_ff = parts["ff"][::-1]  # (only where its shapes chain: emb -> hidden -> emb)
    chains = reversed_ff[0][0].shape[1] == emb and reversed_ff[1][0].shape[1] == reversed_ff[0][0].shape[0]
    ffs = [parts["ff"], *([reversed_ff] if chains else [])]
    return [{**parts, "att": a, "ff": f} for a in atts for f in ffs][1:]


def _norm(obj):
    for scale, shift in (("scale", "shift"), ("weight", "bias")):
        s, b = getattr(obj, scale, None), getattr(obj, shift, None)
        if isinstance(s, nn.Parameter) and isinstance(b, nn.Parameter):
            return (s, b)
    return None


def seed_projections(module):
    """Projections found by layout (see LAYOUTS and NAMES): q/k/v[/out]; a wrapper's heads; a block's parts."""
    try:
        return find_projections(module)[0]
    except Exception as e:  # attnspec's own code: never blamed on the module
        raise internal_error(e) from e


def projection_layout(adapter, module):
    """How the target's projections were found, for the report."""
    if getattr(adapter.projections, "__func__", None) is not Adapter.projections:
        return "the adapter's projections()"
    try:
        return find_projections(module)[1] or "not found"
    except Exception:
        return "not found"


# Keyword arguments of the kinds' constructors that a module may lack: (whether cfg has the option off,
# the Config change that switches it off). A constructor without one is called without it, and only
# configurations with that option off are drawn (what the constructor builds).
OPTIONAL_KEYWORDS = {
    "qkv_bias": (lambda c: not c.qkv_bias, {"qkv_bias": False}),
    "num_kv_heads": (lambda c: c.kv_heads == c.num_heads, {"num_kv_heads": None}),
    "rope_base": (lambda c: c.rope_base is None, {"rope_base": None, "rope_fraction": 1.0, "rope_interleaved": False}),
    "rope_fraction": (lambda c: c.rope_fraction == 1.0, {"rope_fraction": 1.0}),
    "rope_interleaved": (lambda c: not c.rope_interleaved, {"rope_interleaved": False}),
    "window": (lambda c: c.window is None, {"window": None}),
}


class ConstructorAdapter(Adapter):
    """A class or factory called with the kind's constructor arguments, in the seed's order."""

    def __init__(self, factory, kind):
        self.factory, self.kind = factory, kind.name
        self._kind = kind
        try:
            params = inspect.signature(factory).parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                params = OPTIONAL_KEYWORDS
        except (TypeError, ValueError):  # builtins without a signature: just try
            params = OPTIONAL_KEYWORDS
        self.missing = [kw for kw in OPTIONAL_KEYWORDS if kw not in params]  # optional keywords it does not take

    def adjust(self, cfg):
        """No parameter for an option (qkv_bias, num_kv_heads, rope_*, window): draw it off only (what the
        constructor builds), so every example is one the module supports."""
        for kw in self.missing:
            is_off, change = OPTIONAL_KEYWORDS[kw]
            if not is_off(cfg):
                cfg = cfg.replace(**change)
        return cfg

    def _arguments(self, cfg):
        args, kwargs = self._kind.constructor_args(cfg)
        for kw in self.missing:
            kwargs.pop(kw, None)
            if not OPTIONAL_KEYWORDS[kw][0](cfg):
                raise Unsupported(f"the constructor has no {kw} parameter")
        return args, kwargs

    def build(self, cfg):
        args, kwargs = self._arguments(cfg)
        try:
            return self.factory(*args, **kwargs)
        except Unsupported as e:  # the module's own constructor: only an adapter declines configurations
            raise RuntimeError(f"attnspec's Unsupported ({e}) raised by the constructor: only an adapter's build() may "
                               f"decline a configuration (write one to declare what the module does not support)") from None

    def diagnose(self, spec, name):
        """UsageError if the constructor cannot take the kind's arguments: they do not bind to its
        signature, or it raises TypeError/KeyError/AttributeError (another signature, other config keys
        or a config object) for every trial configuration. Any other outcome is the check's to judge."""
        try:
            signature = inspect.signature(self.factory)
        except (TypeError, ValueError):
            signature = None
        configs = [c for c in _trial_configs(self._kind) if self._kind.invalid_reason(c) is None]

        def error(why):
            target = f"{name}{signature}" if signature is not None else f"{name}(...)"
            expected = self._kind.signature if self._kind.signature.startswith("(") else f"({self._kind.signature})"
            return UsageError(f"{spec}: the constructor cannot be called with the {self._kind.name} kind's arguments: "
                              f"expected {name}{expected}, the target is {target} ({why}); check it through an "
                              f"adapter (README.md, Adapters; ready-made ones in attnspec.adapters)")

        if signature is not None:
            try:
                args, kwargs = self._arguments(configs[0])
                signature.bind(*args, **kwargs)
            except TypeError as e:
                raise error(f"the arguments do not bind: {e}") from None
        failures = []
        with torch.random.fork_rng(devices=[]):
            for cfg in configs:
                try:
                    with _time_limit(CALL_TIME_LIMIT_S), contextlib.redirect_stdout(io.StringIO()):
                        self.build(cfg)
                except Unsupported:
                    continue
                except (TypeError, KeyError, AttributeError) as e:
                    failures.append(e)
                    continue
                except (Exception, SystemExit, _Timeout):
                    return  # another failure: the module's, reported by the check
                return  # built
        if failures:
            e = failures[0]
            raise error(f"it raised {type(e).__name__}: {e} for each of {len(failures)} configurations tried")


def _trial_configs(kind):
    """A few small configurations varied in what constructors branch on (bias, dropout, heads)."""
    batch = 2 if kind.batched else 1
    base = Config(d_in=4, d_out=4, num_heads=1, context_length=4, num_tokens=4, batch=batch, dropout=0.0,
                  qkv_bias=False, dtype="float32", scale=1.0, seed=0)
    return [base, base.replace(qkv_bias=True, dropout=0.1), base.replace(num_heads=2)]


@dataclass
class Target:
    """One thing to check: a kind, the user's TARGET text, and the adapter that builds modules."""

    kind: Kind
    name: str
    adapter: Adapter
    variants: tuple = ()  # contract variants checked (spec.variants): the adapter's and --variant's

    @property
    def spec(self):
        return f"{self.kind.name}={self.name}"


def looks_like_file(module_part):
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part or os.path.isfile(module_part)


def _import(module_part):
    """The module named by TARGET: a file (any suffix, loaded as Python source) or an importable name."""
    if looks_like_file(module_part):
        try:
            path = Path(module_part).resolve()
            regular, exists = path.is_file(), path.exists()
        except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
            raise UsageError(f"target file {module_part!r} cannot be resolved: {e}") from None
        if not regular:
            raise UsageError(f"target file {module_part!r} {'is not a regular file' if exists else 'not found'}")
        sys.path.insert(0, str(path.parent))  # so the file can import its siblings
        stem = re.sub(r"\W", "_", path.stem)
        name = f"attnspec_target_{stem}_{abs(hash(str(path)))}"  # loaded afresh on every resolve
        # an explicit source loader: a .txt or suffix-less file is Python source too
        loader = importlib.machinery.SourceFileLoader(name, str(path))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
        sys.modules[name] = module
        try:
            with contextlib.redirect_stdout(sys.stderr):  # prints at import must not corrupt the report
                loader.exec_module(module)
        except BaseException as e:  # the user's file is broken: say so, do not crash
            del sys.modules[name]
            raise UsageError(f"importing {module_part!r} raised {describe(e)}") from None
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot import module {module_part!r}: {describe(e).partition(': ')[2]}") from None
    except UsageError as e:  # e.g. an adapter module whose optional dependency is missing
        raise UsageError(f"importing {module_part!r}: {e}") from None
    except BaseException as e:
        raise UsageError(f"importing {module_part!r} raised {describe(e)}") from None


def _is_adapter(obj):
    if isinstance(obj, type):
        return issubclass(obj, Adapter) or (not issubclass(obj, nn.Module) and callable(getattr(obj, "build", None)))
    return isinstance(obj, Adapter) or (not isinstance(obj, nn.Module) and callable(getattr(obj, "build", None)))


def _kind(name, text):
    kind = KINDS.get(name)
    if kind is None:
        raise UsageError(f"unknown kind {name!r} in {text!r}: expected one of {', '.join(KINDS)}")
    return kind


def _attribute(adapter, name, attr):
    """``adapter.name`` (None if absent); UsageError if reading it raises: a property is the adapter's code."""
    try:
        return getattr(adapter, name, None)
    except BaseException as e:
        raise UsageError(f"adapter {attr!r}: reading its {name!r} raised {describe(e)}") from None


def parse(text):
    """``[KIND=]TARGET`` -> (Kind or None, TARGET, module part, attribute), without importing anything;
    UsageError with a one-line message saying what is wrong. ``=`` cannot appear in a module path, so
    text with one starts with ``KIND=``; without it (kind None) the target must be an adapter that
    declares its ``kind``."""
    kind_name, sep, ref = text.partition("=")
    if not sep:
        kind_name, ref = None, text
    elif not kind_name or not ref:
        raise UsageError(f"malformed target {text!r}: expected KIND=module:Attr or KIND=path/to/file.py:Attr")
    kind = _kind(kind_name, text) if kind_name else None
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"malformed target {ref!r}: expected KIND=module:Attr or KIND=path/to/file.py:Attr "
                         f"(KIND= may be left out for an adapter that declares its kind)")
    return kind, ref, module_part, attr


def resolve(text, variants=()):
    """``[KIND=]TARGET`` -> Target (importing the target), or UsageError with a one-line message saying
    what is wrong (see ``parse``). ``variants``: contract variants checked besides the adapter's
    declared ones (spec.variants)."""
    kind, ref, module_part, attr = parse(text)
    module = _import(module_part)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise UsageError(f"{module_part!r} has no attribute {attr!r} (it has: {', '.join(public[:12])})")
        obj = getattr(obj, part)
    if _is_adapter(obj):
        try:
            adapter = obj() if isinstance(obj, type) else obj
        except UsageError:
            raise
        except BaseException as e:
            raise UsageError(f"adapter {attr!r} cannot be instantiated without arguments: {describe(e)}") from None
        declared = _attribute(adapter, "kind", attr)
        if kind is None and not declared:
            raise UsageError(f"target {ref!r} has no KIND= and adapter {attr!r} declares no kind: write KIND={ref} "
                             f"(KIND one of {', '.join(KINDS)}) or give the adapter a `kind` attribute")
        kind = kind or _kind(declared, f"{attr}.kind")
        if declared and declared != kind.name:
            raise UsageError(f"adapter {attr!r} is written for kind {declared!r}, not {kind.name!r}")
        for hook in ("adjust", "projections", "heads", "sublayers"):  # duck-typed adapters get the defaults
            if not callable(getattr(adapter, hook, None)):
                setattr(adapter, hook, getattr(Adapter(), hook))
    elif callable(obj):
        if kind is None:
            raise UsageError(f"target {ref!r} has no KIND=: a class or factory needs one, e.g. mha={ref} "
                             f"(KIND one of {', '.join(KINDS)}); an adapter can declare its kind instead")
        adapter = ConstructorAdapter(obj, kind)
        adapter.diagnose(f"{kind.name}={ref}", attr)
    else:
        raise UsageError(f"{ref!r} is not a class, factory or adapter: it is {type(obj).__name__} {obj!r:.40}")
    features = _attribute(adapter, "features", attr)
    if features is not None:
        try:
            kind = kind.narrowed((features,) if isinstance(features, str) else tuple(features))
        except (TypeError, ValueError) as e:
            raise UsageError(f"adapter {attr!r} declares features {features!r}: {e}") from None
    declared_variants = _attribute(adapter, "variants", attr) or ()
    if isinstance(declared_variants, str):
        declared_variants = (declared_variants,)
    return Target(kind, ref, adapter, variants=check_names((*declared_variants, *variants)))


BUNDLED = [
    "self-attention=attnspec.impl:SelfAttention_v1",
    "self-attention=attnspec.impl:SelfAttention_v2",
    "causal-attention=attnspec.impl:CausalAttention",
    "mha-wrapper=attnspec.impl:MultiHeadAttentionWrapper",
    "mha=attnspec.impl:MultiHeadAttention",
    "transformer-block=attnspec.impl:TransformerBlock",
    "gqa=attnspec.impl:GroupedQueryAttention",
]
