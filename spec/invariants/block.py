"""The GPT-2 block: pre-LayerNorm sub-layers, GELU feed-forward, residual connections.

Sub-layer inputs and outputs are observed with forward hooks on the adapter's (attention,
feed_forward) submodules (``att`` and ``ff`` by default)."""

import contextlib
import math

import torch

from attnspec import oracle
from attnspec.errors import NotApplicable, Violation, internal_error
from attnspec.invariants.base import invariant
from attnspec.invariants.dropout import FALSE_ALARM, binomial_two_sided_p
from attnspec.strategies import NONZERO_DROPOUTS, OUTLIERS
from attnspec.tolerance import allowed_error, assert_close, residual_rounding


@contextlib.contextmanager
def _hooked(case, replace_outputs=False):
    """Record {name: (input, output)} of the block's sub-layers; optionally make them output zeros
    (``replace_outputs=True``) or what ``replace_outputs[name](output)`` gives."""
    sublayers = case.guard("the adapter's sublayers()", case.target.adapter.sublayers, case.module)
    if sublayers is None:
        raise NotApplicable("the block's sub-layers are not found (no `att`/`ff`; an adapter can name them)")
    seen, handles, errors = {}, [], []
    for name, layer in zip(("att", "ff"), sublayers):
        def hook(module, args, kwargs, output, name=name):
            try:
                return _record(seen, name, (*args, *kwargs.values()), output, replace_outputs)
            except Exception as e:  # our code inside the module's forward: an internal error, not the module's
                errors.append(internal_error(e))
                raise errors[-1] from e
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    except Exception:
        if errors:  # whatever followed from our hook's failure is ours too
            raise errors[0] from None
        raise
    finally:
        for h in handles:
            h.remove()
    if errors:  # raised even if the module caught it
        raise errors[0]


def _record(seen, name, inputs, output, replace_outputs):
    """Record (input, output) of a sub-layer: its first positional (else keyword) tensor argument, and its
    output or, for a tuple (Hugging Face: (hidden, ...)), the tuple's first element. With
    ``replace_outputs`` that output (the first element of a tuple) becomes zeros."""
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if not isinstance(tensor, torch.Tensor) or not isinstance(first, torch.Tensor):
        return None  # not a tensor sub-layer call (e.g. keyword-only inputs): nothing to record
    seen[name] = (first.detach(), tensor.detach())
    if not replace_outputs:
        return None
    replaced = torch.zeros_like(tensor) if replace_outputs is True else replace_outputs[name](tensor)
    return (replaced, *output[1:]) if isinstance(output, tuple) else replaced


def _randomize_norms(case, parts):
    """Random scale/shift, so a swapped or ignored scale/shift shows (both default to 1 and 0)."""
    generator = torch.Generator().manual_seed(case.cfg.seed)
    with torch.no_grad():
        for name in ("norm1", "norm2"):
            for p in parts[name]:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))


@invariant("layernorm-pre-sublayer",
           "each sub-layer sees scale*(h-mean)/sqrt(biased var+1e-5)+shift of its input h (pre-LN, per token)",
           ("transformer-block",), "params", outliers=OUTLIERS)
def layernorm_pre_sublayer(case):
    """Compared with the float64 LayerNorm of what the sub-layer's residual stream holds, within the error of the
    same LayerNorm computed in the input's dtype, its variance accumulated in float32 (torch.var; the seed's). Inputs
    may carry an outlier feature (strategies.OUTLIERS): a LayerNorm that squares the deviations in float16
    overflows there (every token normalized to 0)."""
    parts = case.projections()
    _randomize_norms(case, parts)
    x = case.input()
    with _hooked(case) as seen:
        out = case.forward(x)
    if set(seen) != {"att", "ff"}:
        raise Violation(f"forward did not call the sub-layers {sorted({'att', 'ff'} - set(seen))}")
    att_in, att_out = seen["att"]
    middle = x + att_out  # the residual stream between the sub-layers (eval: dropout is the identity)
    for name, h, norm in (("att", x, "norm1"), ("ff", middle, "norm2")):
        expected = oracle.layer_norm(h.double(), oracle.cast(parts[norm], torch.float64))
        measured = (oracle.layer_norm(h, oracle.cast(parts[norm], h.dtype), torch_var=True) - expected).abs().max()
        assert_close(seen[name][0], expected, dtype=x.dtype, measured=measured,
                     what=f"input of {name} vs LayerNorm via {norm} of the residual stream")
    del out


@invariant("feedforward-gelu-tanh", "ff(h) = W2 gelu_tanh(W1 h + b1) + b2 with W1: emb_dim -> 4*emb_dim "
           "(variant gelu-erf: the exact erf GELU)",
           ("transformer-block",), "params")
def feedforward_gelu_tanh(case):
    parts = case.projections()
    (w1, b1), (w2, _) = parts["ff"]
    emb = case.cfg.d_in
    if tuple(w1.shape) != (4 * emb, emb) or tuple(w2.shape) != (emb, 4 * emb):
        raise Violation(f"feed-forward weights {tuple(w1.shape)}, {tuple(w2.shape)}; expected ({4 * emb}, {emb}), ({emb}, {4 * emb})")
    # Pre-activations of std ~2, where the GELUs differ (tanh vs erf: up to 5e-4 of 1); at GPT-2's
    # initialization (std 0.02) they are ~0.1 and differ by ~1e-11, below float32 resolution.
    generator = torch.Generator().manual_seed(case.cfg.seed)
    with torch.no_grad():
        for p, std in ((w1, 2 / emb**0.5), (b1, 1.0)):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).mul(std).to(p))
    with _hooked(case) as seen:
        case.forward(case.input())
    h, ff_out = seen["ff"]

    gelu = case.contract.gelu

    def ff(dtype):
        (a, b), (c, d) = oracle.cast(parts["ff"], dtype)
        return oracle.linear(oracle.GELU[gelu](oracle.linear(h.to(dtype), (a, b))), (c, d))

    expected = ff(torch.float64)
    assert_close(ff_out, expected, dtype=h.dtype, measured=(ff(h.dtype) - expected).abs().max(),
                 what=f"feed-forward output vs W2 gelu_{gelu}(W1 h + b1) + b2")


@invariant("block-residual-identity",
           "with both sub-layers outputting zeros, the block is the identity (residuals), in eval and in train mode "
           "(dropout never touches the residual stream)",
           ("transformer-block",), "structure", dropouts=NONZERO_DROPOUTS)
def block_residual_identity(case):
    """Exact in both modes (a correct block adds dropped zeros to x). In train mode a block that drops
    the residual stream itself (drop(x + att(LN(x)))) zeroes each element of x with probability p; the
    input is repeated along the batch (at most 64 replicas) until it has n elements with (1-p)^n <= 1e-6,
    the chance that such a block keeps them all and goes unseen."""
    x = case.input()
    with _hooked(case, replace_outputs=True):
        out = case.forward(x)
    assert_close(out, x, dtype=x.dtype, what="block output with zeroed sub-layers vs its input")
    p = case.cfg.dropout
    replicas = min(64, max(1, math.ceil(math.log(1e-6) / math.log(1 - p) / x.numel())))
    x = x.repeat(replicas, 1, 1)
    with _hooked(case, replace_outputs=True):
        out = case.forward(x, train=True)
    assert_close(out, x, dtype=x.dtype, what=f"train-mode (p={p}) block output with zeroed sub-layers vs its input "
                                              f"(dropout applied to the residual stream?)")


BRANCHES = {"attention": {"att": torch.ones_like, "ff": torch.zeros_like},
            "feed-forward": {"att": torch.zeros_like, "ff": torch.ones_like}}


@invariant("block-branch-dropout-inverted",
           "train mode, one sub-layer (attention, then feed-forward) outputting c = 1 and the other 0: out - x is 1 "
           "everywhere (dropout inside the sub-layers) or, elementwise, 0 or 1/(1-p), a fraction p of it 0 (inverted "
           "dropout on the branch); a feed-forward branch not dropped after its sub-layer is dropped inside it (the "
           "sub-layer's train and eval outputs differ); with both outputting 1 the two branches' masks are independent",
           ("transformer-block",), "structure", dropouts=NONZERO_DROPOUTS)
def block_branch_dropout_inverted(case):
    """Exact in the values; the fraction of zeros is an exact binomial test, each of the two at false-alarm rate
    FALSE_ALARM / 4 (and the feed-forward check below at FALSE_ALARM / 4, the masks' independence at FALSE_ALARM / 4:
    FALSE_ALARM per example in all). With both branches dropped and both sub-layers outputting 1, out - x is 0, 1/(1-p)
    or 2/(1-p); exactly one of the two dropped has probability 2p(1-p) an element if the masks are independent: one
    mask drawn once and applied to both branches (0 or 2/(1-p) everywhere) fails (``_branch_masks_independent``).
    The seed drops each branch's output before adding it (x + drop(att(LN(x)))); Hugging Face's GPT-2 drops
    inside the sub-layers (resid_dropout), which the replaced output then bypasses. A dropout after the
    sub-layer that keeps with probability 1-p but does not scale by 1/(1-p) (or scales by 1/p) fails. So
    does a feed-forward path with no dropout at all (``_feed_forward_dropped_inside``)."""
    p, x = case.cfg.dropout, case.input()
    # elements enough that a module which never drops (or never drops one branch alone) fails: the two-sided
    # p-value of a count of 0 is 2 (1-r)^n, below FALSE_ALARM / 4 from (1-r)^n <= FALSE_ALARM / 8 on
    needed = math.ceil(math.log(FALSE_ALARM / 8) / math.log(1 - p))
    pair = math.ceil(math.log(FALSE_ALARM / 8) / math.log(1 - 2 * p * (1 - p)))  # (elements where one of two drops)
    x = x.repeat(max(1, math.ceil(max(64, needed, pair) / x.numel())), 1, 1)  # a shared mask or bias shows; so does no dropout
    kept = 1 / (1 - p)
    tol = residual_rounding(x.dtype, x.abs().max().item() + kept)
    if tol >= min(1.0, kept - 1) / 2:  # out - x cannot tell 0, 1 and 1/(1-p) apart (a large x in half precision)
        raise NotApplicable(f"|x| up to {x.abs().max().item():.3g} in {case.cfg.dtype}: out - x is known to +-{tol:.2g}, "
                            f"too coarse to tell 0, 1 and 1/(1-p) = {kept:.3g} apart", structural=False)
    dropped_on_branch = []
    for branch_name, replace in BRANCHES.items():
        with _hooked(case, replace_outputs=replace):
            out = case.forward(x, train=True)
        branch = (out - x).double()
        ones, zeros, scaled = ((branch - v).abs() <= tol for v in (1.0, 0.0, kept))
        if ones.all():
            if branch_name == "feed-forward":
                _feed_forward_dropped_inside(case, x, p, needed)
            continue
        dropped_on_branch.append(branch_name)
        other = ~(zeros | scaled)
        if other.any():
            index = tuple(int(i) for i in other.nonzero()[0])
            raise Violation(f"train mode (p={p}), the {branch_name} sub-layer outputting 1 and the other 0: out - x = "
                            f"{branch[index].item():.6g} at {index}, expected 0 or 1/(1-p) = {kept:.6g} (inverted dropout "
                            f"on the branch), or 1 everywhere (dropout inside the sub-layers)"
                            + (f"; the kept elements are 1: dropout not scaled by 1/(1-p)" if (branch - 1).abs()[other].max() <= tol else ""))
        dropped, n = int(zeros.sum()), zeros.numel()
        if binomial_two_sided_p(dropped, n, p) < FALSE_ALARM / 4:
            raise Violation(f"train mode: the {branch_name} branch was dropped at {dropped} of {n} elements "
                            f"({dropped / n:.3f}), expected a fraction p={p} (exact binomial test, p-value < {FALSE_ALARM / 4:g})")
    if len(dropped_on_branch) == 2:
        _branch_masks_independent(case, x, p, kept)


def _branch_masks_independent(case, x, p, kept):
    """Both sub-layers outputting 1 in one train-mode call: out - x = (m1 + m2) / (1-p) with m1, m2 the branches'
    keep masks. Independent masks give 1/(1-p) (exactly one kept) at a fraction 2p(1-p) of the elements: a
    two-sided exact binomial test at FALSE_ALARM / 4. One mask shared by both branches never does."""
    with _hooked(case, replace_outputs={"att": torch.ones_like, "ff": torch.ones_like}):
        out = case.forward(x, train=True)
    both = (out - x).double()
    tol = residual_rounding(x.dtype, x.abs().max().item() + 2 * kept)  # (< kept / 2: the caller's check implies it)
    one, n, rate = int(((both - kept).abs() <= tol).sum()), both.numel(), 2 * p * (1 - p)
    if binomial_two_sided_p(one, n, rate) < FALSE_ALARM / 4:
        raise Violation(f"train mode (p={p}), both sub-layers outputting 1: exactly one of the two branches was dropped "
                        f"at {one} of {n} elements ({one / n:.3f}), expected a fraction 2p(1-p) = {rate:.3f} for "
                        f"independent masks (exact binomial test, p-value < {FALSE_ALARM / 4:g}): the two residual "
                        f"dropouts share their masks")


def _feed_forward_dropped_inside(case, x, p, needed):
    """The feed-forward branch is not dropped after the sub-layer: the sub-layer must drop inside (Hugging Face's
    GPT-2: resid_dropout after c_proj; fairseq: dropout after the activation). With the attention sub-layer
    outputting 0 its input is the same in train and eval mode, so its output, recorded by the hooks, must differ
    between the two where at least ``needed`` = log(FALSE_ALARM / 8) / log(1-p) outputs are larger than rounding
    (fewer: nothing to conclude)."""
    outputs = []
    for train in (True, False):
        with _hooked(case, replace_outputs={"att": torch.zeros_like, "ff": lambda t: t}) as seen:
            case.forward(x, train=train)
        if "ff" not in seen:
            return
        outputs.append(seen["ff"][1].double())
    trained, evaluated = outputs
    tol = allowed_error(x.dtype, evaluated.abs().max().item())
    if trained.shape != evaluated.shape or int((evaluated.abs() > tol).sum()) < needed:
        return
    if (trained - evaluated).abs().max().item() <= tol:
        raise Violation(f"train mode (p={p}): the feed-forward path is never dropped, neither on its branch (its output "
                        f"replaced by 1 reaches out - x undropped) nor inside the sub-layer (its train-mode output equals "
                        f"its eval output on {trained.numel()} elements; a correct module drops none with probability "
                        f"< {FALSE_ALARM / 4:g})")
