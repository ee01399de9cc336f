"""Targets: resolve ``KIND=TARGET`` into something that builds modules, and adapters.

TARGET is ``package.module:Attr`` or ``path/to/file.py:Attr``. Attr is a class or factory with the
kind's constructor signature, or an ``Adapter`` (a subclass, an instance, or any object with a
``build(cfg)`` method) for modules whose constructor or parameter layout differs from the seed's.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from attnspec.case import describe
from attnspec.errors import Unsupported, UsageError
from attnspec.kinds import KINDS, Kind


class Adapter:
    """How to check a module whose constructor or layout is not the seed's.

    Override ``build``; raise ``Unsupported(reason)`` for configurations the module does not support
    (they are skipped and counted, never silently), or override ``adjust`` to draw only supported ones. Override ``projections`` to say where the
    query/key/value/output projections live, so parameter-level invariants apply; returning None
    makes them not applicable."""

    kind = None  # optional: the kind this adapter is written for

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


# The seed's names first, then the common alternatives (nanoGPT, Hugging Face).
NAMES = {
    "query": ("W_query", "q_proj", "query", "W_q"),
    "key": ("W_key", "k_proj", "key", "W_k"),
    "value": ("W_value", "v_proj", "value", "W_v"),
    "out": ("out_proj", "o_proj"),
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


def _linear(obj, transpose_parameter):
    if isinstance(obj, nn.Linear):
        return (obj.weight, obj.bias)
    if isinstance(obj, nn.Parameter) and obj.dim() == 2 and transpose_parameter:
        return (obj.T, None)  # SelfAttention_v1 stores (d_in, d_out); nn.Linear's layout is (out, in)
    return None


def _norm(obj):
    for scale, shift in (("scale", "shift"), ("weight", "bias")):
        s, b = getattr(obj, scale, None), getattr(obj, shift, None)
        if isinstance(s, nn.Parameter) and isinstance(b, nn.Parameter):
            return (s, b)
    return None


def seed_projections(module):
    """Projections found by name (the seed's first, see NAMES): q/k/v[/out]; a wrapper's heads; a block's parts."""
    # nn.Parameter (SelfAttention_v1's (d_in, d_out) layout) only under the seed's own names
    qkv = {n: _linear(_first(_named(module, NAMES[n][:1], nn.Parameter), _named(module, NAMES[n], nn.Linear)), True)
           for n in ("query", "key", "value")}
    if all(p is not None for p in qkv.values()):
        out = _named(module, NAMES["out"], nn.Linear)
        return qkv if out is None else {**qkv, "out": _linear(out, False)}
    if isinstance(getattr(module, "heads", None), (nn.ModuleList, list)):
        heads = [seed_projections(h) for h in module.heads]
        return None if not heads or any(h is None for h in heads) else heads
    att, ff = (_named(module, NAMES[n], nn.Module) for n in ("att", "ff"))
    if att is not None and ff is not None:
        att = seed_projections(att)
        linears = [m for m in ff.modules() if isinstance(m, nn.Linear)]
        norms = [_norm(_named(module, NAMES[n], nn.Module)) for n in ("norm1", "norm2")]
        if not isinstance(att, dict) or "out" not in att or len(linears) != 2 or None in norms:
            return None
        return {"att": att, "norm1": norms[0], "norm2": norms[1],
                "ff": [(linears[0].weight, linears[0].bias), (linears[1].weight, linears[1].bias)]}
    return None


class ConstructorAdapter(Adapter):
    """A class or factory called with the kind's constructor arguments, in the seed's order."""

    def __init__(self, factory, kind):
        self.factory, self.kind = factory, kind.name
        self._kind = kind
        try:
            params = inspect.signature(factory).parameters
            self.accepts_qkv_bias = "qkv_bias" in params or any(
                p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):  # builtins without a signature: just try
            self.accepts_qkv_bias = True

    def build(self, cfg):
        args, kwargs = self._kind.constructor_args(cfg)
        if "qkv_bias" in kwargs and not self.accepts_qkv_bias:
            if kwargs.pop("qkv_bias"):
                raise Unsupported("the constructor has no qkv_bias parameter")
        return self.factory(*args, **kwargs)


@dataclass
class Target:
    """One thing to check: a kind, the user's TARGET text, and the adapter that builds modules."""

    kind: Kind
    name: str
    adapter: Adapter

    @property
    def spec(self):
        return f"{self.kind.name}={self.name}"


def _looks_like_file(module_part):
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part or os.path.isfile(module_part)


def _import(module_part):
    """The module named by TARGET: a file (any suffix, loaded as Python source) or an importable name."""
    if _looks_like_file(module_part):
        path = Path(module_part).resolve()
        if not path.is_file():
            raise UsageError(f"target file {module_part!r} not found")
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
    except BaseException as e:
        raise UsageError(f"importing {module_part!r} raised {describe(e)}") from None


def _is_adapter(obj):
    if isinstance(obj, type):
        return issubclass(obj, Adapter) or (not issubclass(obj, nn.Module) and callable(getattr(obj, "build", None)))
    return isinstance(obj, Adapter) or (not isinstance(obj, nn.Module) and callable(getattr(obj, "build", None)))


def parse(text):
    """``KIND=TARGET`` -> (Kind, TARGET, module part, attribute), without importing anything; UsageError
    with a one-line message saying what is wrong."""
    kind_name, sep, ref = text.partition("=")
    if not sep or not kind_name or not ref:
        raise UsageError(f"malformed target {text!r}: expected KIND=module:Attr or KIND=path/to/file.py:Attr")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise UsageError(f"unknown kind {kind_name!r} in {text!r}: expected one of {', '.join(KINDS)}")
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"malformed target {ref!r}: expected module:Attr or path/to/file.py:Attr")
    return kind, ref, module_part, attr


def resolve(text):
    """``KIND=TARGET`` -> Target, or UsageError with a one-line message saying what is wrong."""
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
        except BaseException as e:
            raise UsageError(f"adapter {attr!r} cannot be instantiated without arguments: {describe(e)}") from None
        declared = getattr(adapter, "kind", None)
        if declared and declared != kind.name:
            raise UsageError(f"adapter {attr!r} is written for kind {declared!r}, not {kind.name!r}")
        for hook in ("adjust", "projections", "heads", "sublayers"):  # duck-typed adapters get the defaults
            if not callable(getattr(adapter, hook, None)):
                setattr(adapter, hook, getattr(Adapter(), hook))
    elif callable(obj):
        adapter = ConstructorAdapter(obj, kind)
    else:
        raise UsageError(f"{ref!r} is not a class, factory or adapter: it is {type(obj).__name__} {obj!r:.40}")
    return Target(kind, ref, adapter)


BUNDLED = [
    "self-attention=attnspec.impl:SelfAttention_v1",
    "self-attention=attnspec.impl:SelfAttention_v2",
    "causal-attention=attnspec.impl:CausalAttention",
    "mha-wrapper=attnspec.impl:MultiHeadAttentionWrapper",
    "mha=attnspec.impl:MultiHeadAttention",
    "transformer-block=attnspec.impl:TransformerBlock",
]
