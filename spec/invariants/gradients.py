"""Gradients: training works. Backward is checked in train mode at dropout 0 (the path training takes,
deterministic; eval mode if an --example gives p > 0), always as a vector-Jacobian product with a random
output cotangent c (never ``.sum()``, whose all-ones cotangent hides errors that cancel across the
output), one backward pass per example.

A parameter is *frozen mask* (exempt from the checks here) when it does not require grad and holds only
0s and 1s: a causal mask kept as ``nn.Parameter(..., requires_grad=False)`` is a buffer in all but name.
"""

import math

import torch
import torch.fx.experimental.symbolic_shapes  # noqa: F401  (torch.autograd.grad imports it, and sympy, on first
# use: 0.5 s in every worker process, or a first backward that outlives a short --time-limit; here, once)
from hypothesis import strategies as st

from attnspec import oracle
from attnspec.case import Case
from attnspec.errors import NotApplicable, Unsupported, Violation
from attnspec.invariants.base import ALL_KINDS, invariant
from attnspec.strategies import REGIMES, ZERO_OFFSET
from attnspec.tolerance import ROPE_ANGLES, RTOL, allowed_error, assert_close, gradient_magnitudes

COTANGENT_SALT = 7919  # the cotangent's seed is cfg.seed + this: independent of the input's
# Central-difference steps, relative to a tensor's rms: ~eps^(1/3), where truncation (h^2) and rounding (eps / h) meet.
FD_STEPS = {torch.float64: 1e-5, torch.float32: 5e-3}
LOCAL_STEP = 1e-2  # gradient-reaches-parameters: a step this small (times rms) must move the output too


def cotangent(case, shape):
    """A random output cotangent c ~ N(0, 1), seeded from the config; for seeds with (seed // 16) odd laid out with its
    last two dimensions' strides swapped (the same values): a loss on a transposed output hands backward such a
    gradient (cross_entropy(logits.transpose(1, 2), y)), and a hand-written backward that reads it as contiguous
    computes on other values."""
    generator = torch.Generator().manual_seed(case.cfg.seed + COTANGENT_SALT)
    c = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=case.cfg.device,
                                                                        dtype=case.cfg.torch_dtype)
    if (case.cfg.seed // 16) % 2 == 1 and c.dim() >= 2:
        c = c.transpose(-1, -2).contiguous().transpose(-1, -2)
    return c


def _direction(t, salt, centred=False):
    """A random direction for ``t``: N(0, 1) entries scaled by t's rms (1 where t is all zeros); with
    ``centred``, by the rms of t's deviations from its mean over the last dim (an input: offset + scale
    N(0, 1) varies on the scale of ``scale``, and LayerNorm is nonlinear on that scale, not the offset's)."""
    generator = torch.Generator().manual_seed(salt)
    u = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
    spread = t.detach().double()
    if centred and spread.dim():
        spread = spread - spread.mean(-1, keepdim=True)
    rms = spread.pow(2).mean().sqrt().item() if t.numel() else 0.0
    return u * (rms if rms > 0 else 1.0)


def _frozen_mask(p):
    return not p.requires_grad and (not p.is_floating_point() or bool(((p == 0) | (p == 1)).all()))


def _parameters(module):
    """(name, parameter) of every parameter that is not a frozen mask."""
    return [(n, p) for n, p in module.named_parameters() if not _frozen_mask(p)]


def _train(case):
    """Train mode at dropout 0 (the path training takes); eval mode where a dropout p > 0 was given
    (--example), so that the function differentiated is deterministic."""
    return case.cfg.dropout == 0


def _vjp(case, x, tensors, unreached=None, train=None, twice=False):
    """(output, c, [d<c, forward(x)>/dt for t in tensors]), None-free (zeros where no gradient flows or a
    tensor does not require grad; their indices are added to the set ``unreached`` if one is given).
    Violation if the output is cut off from autograd. ``train``: the mode, by default ``_train``. ``twice``: a
    second backward through the same graph (retain_graph=True: several losses, GAN steps) must give the same
    gradients: a hand-written backward that overwrites what it saved shows."""
    train = _train(case) if train is None else train
    validated = case.inference() == "torch.inference_mode()"
    if validated:  # a validation pass before the training step (Lightning's sanity check): what it caches must not
        case.forward(x.detach(), train=train)  # break training ("Inference tensors cannot be saved for backward")
    try:
        out = case.forward(x, train=train, needs_grad=True)
    except Violation as e:
        raise Violation(f"{e} (after a first call under torch.inference_mode())" if validated else str(e)) from None
    c = cotangent(case, out.shape)
    wanted = [t for t in tensors if t.requires_grad]
    if wanted and not out.requires_grad:
        raise Violation("the output does not require grad although the input and parameters do: forward is cut "
                        "off from autograd (torch.no_grad, .detach(), .data?)")

    def backward():  # as in training: a checkpointed sub-layer recomputes its forward now, in the mode forward ran in,
        if train:  # with the RNG moved on since forward (its recomputation must restore forward's RNG state)
            case.module.train()
            case.seed(case.cfg.seed + 7919)
        try:
            first = torch.autograd.grad(out, wanted, c, allow_unused=True, retain_graph=twice)
            if twice:
                for t, g, again in zip(wanted, first, torch.autograd.grad(out, wanted, c, allow_unused=True)):
                    if g is not None and again is not None:
                        assert_close(again, g, dtype=x.dtype, what=f"gradient w.r.t. a tensor of shape {tuple(t.shape)} "
                                     f"from a second backward through the same graph (retain_graph=True) vs the first: "
                                     f"the backward changes what it saved?")
            return first
        finally:
            if train:
                case.module.eval()

    grads = case.guard("backward", backward) if wanted else []
    by_id = {id(t): g for t, g in zip(wanted, grads)}
    if unreached is not None:
        unreached.update(i for i, t in enumerate(tensors) if by_id.get(id(t)) is None)
    return out, c, [torch.zeros_like(t) if by_id.get(id(t)) is None else by_id[id(t)] for t in tensors]


def _labelled(parts, prefix=""):
    """(label, tensor) for every tensor of a projections tree, e.g. ("head 1 key bias", t)."""
    if isinstance(parts, torch.Tensor):
        return [(prefix.strip(), parts)]
    if isinstance(parts, dict):
        return [lt for k, v in parts.items() for lt in _labelled(v, f"{prefix} {k}")]
    if isinstance(parts, tuple) and len(parts) == 2:  # (weight, bias) or (scale, shift)
        names = ("scale", "shift") if prefix.split(" ")[-1].startswith("norm") else ("weight", "bias")
        return [lt for name, v in zip(names, parts) if v is not None for lt in _labelled(v, f"{prefix} {name}")]
    if isinstance(parts, (list, tuple)):  # a wrapper's heads, a block's feed-forward layers
        return [lt for i, v in enumerate(parts) for lt in _labelled(v, f"{prefix}[{i}]" if prefix else f"head {i}")]
    return []


def _rebuild(parts, leaves):
    """``parts`` with its tensors replaced, in _labelled order, by ``leaves``."""
    it = iter(leaves)

    def walk(node):
        if isinstance(node, torch.Tensor):
            return next(it)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node
    return walk(parts)


def _parameter_grad_view(module, grads, t):
    """The part of a parameter's gradient that ``t`` (a parameter, or a view of one: ``W.T``, rows of a
    fused in_proj) covers, as (name, gradient of t). None if t lies in no parameter's storage."""
    for (name, p), g in zip(module.named_parameters(), grads):
        if p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            continue
        start = t.storage_offset() - p.storage_offset()
        if not 0 <= start < p.numel():
            continue
        laid_out = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device)
        laid_out.copy_(g)  # the parameter's memory layout, so t's strides and offset index into it
        return name, laid_out.as_strided(t.shape, t.stride(), laid_out.storage_offset() + start)
    return None


def _oracle_vjp(case, parts, x, c, dtype, jitter=0.0, angles=torch.float64):
    """The oracle's gradients of <c, reference(x)> w.r.t. x and each tensor of ``parts`` (_labelled order),
    evaluated in ``dtype`` with every input (x, c, the tensors) multiplied by 1 + jitter N(0, 1), and for
    each tensor the magnitude of its gradient's terms: a 1-D tensor (a bias, a LayerNorm scale/shift) is
    made per token, so its gradient is a sum over tokens whose terms are seen; the magnitude is then
    max_k sum_tokens |term| (the key bias's gradient is such a sum that cancels to 0: softmax is invariant
    to it), else max |gradient|. A LayerNorm scale's magnitude is at least its shift's (the normalized
    input it multiplies is O(1); with emb_dim 1 it is 0 exactly and only rounding is left)."""
    generator = torch.Generator().manual_seed(case.cfg.seed + COTANGENT_SALT + 1)

    def prepare(t):
        t = t.detach().to(torch.float64)
        if jitter:
            t = t * (1 + jitter * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device))
        return t.to(dtype)

    labelled = _labelled(parts)
    tensors = [t for _, t in labelled]
    xd = prepare(x).requires_grad_(True)
    lead = tuple(x.shape[:-1])
    leaves = [(prepare(t).expand(*lead, *t.shape) if t.dim() == 1 else prepare(t)).clone().requires_grad_(True)
              for t in tensors]
    out = oracle.evaluate(case.kind, case.cfg, _rebuild(parts, leaves), xd, case.contract.gelu, angles)
    grads = torch.autograd.grad(out, [xd, *leaves], prepare(c), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip([xd, *leaves], grads)]
    lead_dims = tuple(range(len(lead)))
    summed = [grads[0]] + [g.sum(lead_dims) if t.dim() == 1 else g for t, g in zip(tensors, grads[1:])]
    magnitudes = [grads[0].abs().max().item()] + [
        (g.abs().sum(lead_dims) if t.dim() == 1 else g.abs()).max().item() if g.numel() else 0.0
        for t, g in zip(tensors, grads[1:])]
    by_label = dict(zip((label for label, _ in labelled), magnitudes[1:]))
    for i, (label, _) in enumerate(labelled):
        if label.endswith(" scale"):
            magnitudes[i + 1] = max(magnitudes[i + 1], by_label.get(label[:-len("scale")] + "shift", 0.0))
    return summed, magnitudes


def _freezing(case, named):
    """gradient-oracle's setting, by bits 2-3 of cfg.seed (bits 0-1 pick the autograd mode of other calls,
    ``Case.inference``), applied to the module's parameters ``named`` (name -> parameter): (x constant, names of the
    parameters frozen here, the setting's words for messages). 0: x and every parameter require grad; 1: every
    parameter frozen (LoRA, adapters: the input's gradient alone); 2: x constant (the first layer); 3: the
    parameters of every other layer frozen (a layer: the parameters of one submodule, weight and bias together),
    from the first layer or the second by bit 5 (one projection frozen beside a trained one)."""
    setting = (case.cfg.seed >> 2) % 4
    trainable = [name for name, p in named.items() if p.requires_grad]
    layers = list(dict.fromkeys(name.rpartition(".")[0] for name in trainable))
    alternate = set(layers[(case.cfg.seed >> 5) % 2::2])
    frozen = {1: trainable, 3: [name for name in trainable if name.rpartition(".")[0] in alternate]}.get(setting, [])
    for name in frozen:
        named[name].requires_grad_(False)
    words = {0: "", 1: " (every parameter frozen)", 2: " (x does not require grad)",
             3: f" (frozen: {', '.join(frozen) or 'none'})"}[setting]
    return setting == 2, set(frozen), words


@invariant("gradient-oracle",
           "train mode, dropout 0: the gradients of <c, forward(x)> w.r.t. x and every projection parameter "
           "equal the float64 oracle's on the module's own parameters (c a random cotangent); also with every "
           "parameter frozen (x's alone), with every other parameter frozen, and with x constant (the parameters' "
           "alone); in eval mode too; a second backward through the same graph gives the same gradients; a float32 example "
           "of scale <= 3 in float16 or bfloat16 as well",
           ALL_KINDS, "params", dropouts=st.just(0.0), dtypes=("float32", "float64"), offsets=ZERO_OFFSET,
           regimes=(*REGIMES, "longest", "longest"))  # tiled backward kernels branch past 256 tokens as well
def gradient_oracle(case):
    """Tolerance (spec/tolerance.py), per gradient tensor: |module - oracle64| <= max(RTOL[dtype] * magnitude,
    10 * measured), measured the error of the same reference computed in the module's dtype; in float64,
    which has no lower precision, the change of the float64 reference when its inputs are perturbed by
    RTOL[float64] (relative; the float64 rule of spec/tolerance.py allows float32 roundings of constants
    and steps): the error such an implementation makes where the gradient is ill-conditioned (softmax's
    backward and the sums over tokens of a weight's gradient cancel). Drawn in float32 and float64, on
    centred inputs: in float16/bfloat16, or off-centre (near-identical tokens), the softmax is near
    uniform and its gradients are made of rounding, which another correct kernel (SDPA) rounds otherwise.
    The forward invariants cover off-centre inputs and half dtypes. The seed picks the setting (``_freezing``): x
    and every parameter require grad; or every parameter is frozen (fine-tuning around frozen weights); or x does
    not require grad (the first layer); or every other parameter is frozen (partial fine-tuning): a hand-written
    backward that skips a gradient when another input needs none, or takes a fused path when one weight is
    frozen, shows. And the mode: train, or for half the seeds eval (saliency maps, fine-tuning with model.eval(),
    adversarial inputs: at dropout 0 the same function), where a path that detaches what eval needs no gradient
    for shows. A float32 example of scale <= 3 is then checked in float16 (for a quarter of the seeds bfloat16, whose
    rounding hides more) as well, where the same rule holds for what mixed-precision training gets wrong by far (a
    fused half-precision softmax whose backward drops the scale: 500 times the reference's own error), not for
    rounding."""
    from attnspec.runner import unsupported_dtype  # (the runner imports the catalogue)

    _gradient_oracle(case)
    if case.cfg.dtype == "float32" and case.cfg.scale <= 3:
        half = case.cfg.replace(dtype="bfloat16" if (case.cfg.seed >> 8) % 4 == 3 else "float16")
        if unsupported_dtype(case.target, half, case.time_limit):  # (as in every example drawn in that dtype)
            return
        try:
            _gradient_oracle(Case(case.target, half, case.time_limit, case.stdout_sink), f" (the example in {half.dtype})")
        except (NotApplicable, Unsupported):  # (not checkable in that dtype: the float32 check stands)
            pass


def _gradient_oracle(case, where=""):
    """gradient-oracle on ``case``, in its dtype; ``where`` ends each message."""
    parts, x = case.projections(), case.input()
    if case.kind.head_split and case.kind.structure == "attention" and "out" not in parts:
        raise NotApplicable("the output projection is not found (out_proj; an adapter can name it)")
    if case.kind.structure == "block" and case.cfg.d_in <= 2:
        raise NotApplicable("LayerNorm over emb_dim <= 2 features puts every token on one line: the gradients "
                            "behind it cancel to rounding noise", structural=False)
    labelled = _labelled(parts)
    named = dict(case.module.named_parameters())
    constant, frozen, setting = _freezing(case, named)
    x = x.requires_grad_(not constant)  # constant: the first layer, fed data: the parameters' gradients alone
    train = _train(case) and (case.cfg.seed >> 6) % 2 == 0
    out, c, grads = _vjp(case, x, [x, *named.values()], train=train, twice=(case.cfg.seed >> 7) % 2 == 1)
    setting += "" if train else " (eval mode)"
    got = [] if constant else [(0, f"the input x{setting}", grads[0])]  # (index in the oracle's list: x first)
    for i, (label, t) in enumerate(labelled, start=1):
        found = _parameter_grad_view(case.module, grads[1:], t)
        if found is None:
            raise NotApplicable(f"the {label} projection is not (a view of) a parameter of the module")
        name, g = found
        if name not in frozen:  # (a parameter the module itself created frozen is compared: it must get gradients)
            got.append((i, f"{label} ({name}{'' if named[name].requires_grad else ', requires_grad=False'}){setting}", g))
    expected, magnitudes = _oracle_vjp(case, parts, x, c, torch.float64)
    magnitudes = gradient_magnitudes(magnitudes)

    def compare(measured):
        for i, label, g in got:
            assert_close(g, expected[i], dtype=x.dtype, magnitude=magnitudes[i], measured=measured(i),
                         what=f"gradient w.r.t. {label} vs the float64 oracle's{where}")

    try:  # within RTOL[dtype] of the magnitudes, the reference's own error need not be measured
        return compare(lambda i: 0.0)
    except Violation:
        pass
    if x.dtype == torch.float64:
        low, _ = _oracle_vjp(case, parts, x, c, torch.float64, jitter=RTOL[torch.float64], angles=ROPE_ANGLES)
    else:
        low, _ = _oracle_vjp(case, parts, x, c, x.dtype, angles=ROPE_ANGLES)
    compare(lambda i: (low[i].double() - expected[i]).abs().max().item() if expected[i].numel() else 0.0)


@invariant("gradient-finite-differences",
           "float64, train mode: the analytic directional derivative of <c, forward> along a random direction of x, of all "
           "parameters and of one parameter alone, equals the central difference (with dropout, every call drops the "
           "same positions; then in float32 too)",
           ALL_KINDS, "forward", dtypes=("float64",))
def gradient_finite_differences(case):
    """Black-box: needs no projections. phi(s) = <c, forward(theta + s u)> for theta = x, then theta = all
    parameters at once (u ~ rms(t) N(0, 1) per tensor t; a wrong gradient of any one tensor shows,
    unless errors cancel exactly: probability 0), h = FD_STEPS[dtype]. D(h) = (phi(h) - phi(-h)) / 2h = phi'(0)
    + h^2 phi3 / 6 + O(h^4), phi3 the third derivative. Its error has two parts, both given to
    spec/tolerance.py: rounding, |phi error| <= RTOL[dtype] * S with S = <|c|, |forward|> (the largest
    over the points evaluated: an output dropped to 0 at s = 0 is not at s = h), so
    |D(h) error| <= RTOL[dtype] * S / h (the magnitude S / h); truncation, measured as |D(h) - D(2h)|
    (= 3 h^2 |phi3| / 6, three times D(h)'s own). A failing parameter direction is then split per
    tensor to name the culprit; one tensor, chosen by the seed, is also checked alone (a wrong backward on one path,
    say the scores' through a fused softmax-dropout, is a small part of the joint derivative where the
    softmax is flat). One backward and 12 forwards per example. With dropout p > 0 every call is
    seeded alike, so the same positions drop and phi is the smooth function of one mask: a backward that
    recomputes forward with another mask (activation checkpointing without preserve_rng_state) or that
    ignores the mask shows. Every call runs with autograd on, so that the module takes one path. A module
    whose masks do not follow the global RNG (a private generator) has its dropout examples redrawn. In float32 too
    (the step larger, the bound looser): with dropout p > 0 on centred inputs of scale <= 3, the same check follows on
    the example in float32, where a fused kernel that falls back to eager code in float64 (a softmax-dropout or
    dropout-add Function whose backward ignores the mask) shows. At p = 0 gradient-oracle compares float32 gradients;
    off-centre or large inputs saturate the softmax so far that a float32 difference quotient is rounding."""
    if case.cfg.dtype != "float64":
        raise NotApplicable("finite differences need float64")
    _finite_differences(case)
    if case.cfg.dropout > 0 and case.cfg.offset == 0 and case.cfg.scale <= 3:
        _finite_differences(Case(case.target, case.cfg.replace(dtype="float32"), case.time_limit, case.stdout_sink),
                            " (the example in float32)")


def _finite_differences(case, where=""):
    """gradient-finite-differences on ``case``, in its dtype (float64 or float32); ``where`` ends each message."""
    x = case.input()
    step = FD_STEPS[x.dtype]
    params = _parameters(case.module)
    if case.cfg.dropout > 0 and not torch.equal(*(case.forward(x, train=True, needs_grad=True) for _ in range(2))):
        raise NotApplicable("train mode at dropout > 0 is not a function of the global RNG state (a private "
                            "generator?): finite differences need the same mask in every call", structural=False)
    x = x.requires_grad_(True)
    out, c, grads = _vjp(case, x, [x] + [p for _, p in params], train=True)
    scale = (c.abs() * out.detach().abs()).sum().item()
    x0 = x.detach().clone()

    def check(label, tensors, tensor_grads, salt):
        directions = [_direction(t, salt + i, centred=t is x0) for i, t in enumerate(tensors)]
        originals = [t.detach().clone() for t in tensors]

        def phi(s):
            try:
                with torch.no_grad():
                    for t, o, u in zip(tensors, originals, directions):
                        t.copy_(o + s * u)
                terms = c * case.forward(x0, train=True, needs_grad=True).detach()
                sizes.append(terms.abs().sum().item())  # the rounding of phi(s) is relative to this
                return terms.sum().item()
            finally:
                with torch.no_grad():
                    for t, o in zip(tensors, originals):
                        t.copy_(o)

        sizes = [scale]
        d1 = (phi(step) - phi(-step)) / (2 * step)
        d2 = (phi(2 * step) - phi(-2 * step)) / (4 * step)
        analytic = sum((g.detach().double() * u.double()).sum().item() for g, u in zip(tensor_grads, directions))
        assert_close(torch.tensor(analytic, dtype=torch.float64), torch.tensor(d1, dtype=torch.float64),
                     dtype=x.dtype, magnitude=max(sizes) / step, measured=abs(d1 - d2),
                     what=f"directional derivative w.r.t. {label}, analytic vs central difference (step {step:g}){where}")

    check("the input x", [x0], grads[:1], case.cfg.seed)
    if not params:
        return
    try:
        check("all parameters", [p for _, p in params], grads[1:], case.cfg.seed + 1)
    except Violation as joint:
        for i, ((name, p), g) in enumerate(zip(params, grads[1:])):
            frozen = "" if p.requires_grad else ", which does not require grad"
            check(f"parameter {name!r}{frozen}", [p], [g], case.cfg.seed + 1 + i)
        raise joint
    i = case.cfg.seed % len(params)  # one tensor alone: its error is not diluted by the others' derivatives
    (name, p), g = params[i], grads[1 + i]
    check(f"parameter {name!r} alone", [p], [g], case.cfg.seed + 1 + i)


@invariant("gradient-reaches-parameters",
           "every parameter that changes the output when perturbed requires grad and is reached by autograd (no .detach(), no_grad, .data cuts it off)",
           ALL_KINDS, "forward", dropouts=st.just(0.0))
def gradient_reaches_parameters(case):
    """Influence is decided by perturbing, not assumed: t += rms(t) N(0, 1) must move the output by more
    than the dtype's tolerance. A parameter that legitimately gets no gradient also has no influence
    (the key projection's bias: softmax is shift-invariant per row; the query and key with one token),
    so it is exempt by construction. A zero gradient is also right where the output is flat around the
    parameter although a large step moves it: a saturated softmax (scores thousands apart, e.g. rotary
    angles on off-centre input) has weights exactly 0 and 1 and gradient exactly 0; so a zero gradient
    fails only if autograd finds no path to the parameter at all and a step of LOCAL_STEP rms(t) moves
    the output too. One forward+backward, then one or two forwards per parameter without gradient."""
    x = case.input()
    params = _parameters(case.module)
    unreached = set()  # parameters autograd found no path to (.detach(), torch.no_grad, .data, requires_grad=False)
    out, _, grads = _vjp(case, x, [p for _, p in params], unreached)
    magnitude = max(out.abs().max().item(), x.abs().max().item())

    def moved_by(i, p, step):
        """max |forward(x) - out| after p += step * rms(p) N(0, 1)."""
        original = p.detach().clone()
        try:
            with torch.no_grad():
                p.copy_(original + step * _direction(p, case.cfg.seed + i))
            return (case.forward(x, train=_train(case)) - out).abs().max().item()
        except Violation:  # the perturbed module fails (say, a non-finite output): it surely has influence
            return math.inf
        finally:
            with torch.no_grad():
                p.copy_(original)

    for i, ((name, p), g) in enumerate(zip(params, grads)):
        if i not in unreached:
            continue  # autograd reaches it: its gradient flows, even where a saturated softmax makes it 0
        moved = moved_by(i, p, 1.0)
        if moved <= allowed_error(x.dtype, magnitude):  # NaN compares False: influence
            continue
        if not p.requires_grad:
            raise Violation(f"parameter {name!r} changes the output (by up to {moved:.3g} when perturbed) but has "
                            f"requires_grad=False: training never updates it")
        if moved_by(i, p, LOCAL_STEP) <= allowed_error(x.dtype, magnitude):
            continue  # flat around p: a zero gradient is right (a saturated softmax)
        if not bool((g != 0).any()):
            raise Violation(f"parameter {name!r} changes the output (by up to {moved:.3g} when perturbed) but its "
                            f"gradient is zero everywhere: no gradient reaches it (.detach(), torch.no_grad, .data?)")
