"""Call history: a module is a function of its parameters and its input, whatever was called before.

Every other invariant builds a fresh module and calls it the same way a few times; these call it at
other shapes, on other inputs, in train mode, after its parameters change, and compare with a module
that is fresh. The dropout checks here are forward-level: they need no observable weights, so they
apply to fused kernels (scaled_dot_product_attention) as well.
"""

import copy
import math

import torch

from attnspec.errors import NotApplicable, Violation
from attnspec.invariants.base import ALL_KINDS, DROPOUT_KINDS, PADDING_KINDS, invariant
from attnspec.strategies import NONZERO_DROPOUTS
from attnspec.tolerance import allowed_error, assert_close

FALSE_ALARM = 1e-6  # per example, for the statistical checks below
MAX_REPLICAS = 4096  # batch replicas of the input, for the rare smallest configurations (T = 1, p = 0.05)


def _fresh_with_parameters_of(case, module):
    """A newly built module, given ``module``'s parameter values (by name) before its first call."""
    fresh = case.build()
    source = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name not in source or source[name].shape != p.shape:
                raise Violation(f"two modules built from one configuration have different parameters ({name!r})")
            p.copy_(source[name])
    return fresh


def _other_shape(case):
    """(num_tokens, batch) unlike the example's: 1 token (a generation step) unless the example has 1."""
    T = case.cfg.num_tokens
    return (1 if T > 1 else min(2, case.cfg.context_length)), case.cfg.batch + 1


# Calls of one shape after which history-independent calls again: real code switches paths once a shape is warm
# (an autotuner's pick after timing trials, a captured CUDA graph, a compiled region), mostly within a few dozen calls.
WARM_CALLS = 32


@invariant("history-independent",
           "after calls at another shape and on another input of x's shape, in eval and train mode (and with a padding "
           "mask, many calls of x's shape, or a first call in bfloat16), forward(x) equals forward(x) of a fresh module "
           "with the same parameters and RNG state",
           ALL_KINDS, "forward")
def history_independent(case):
    """Eval then train: eval calls at (1 token, batch + 1) and on another input x' of x's shape (for half the seeds
    x's tokens but the last: a prefix cache keyed on the first tokens shows), then a
    train-mode call on x, compared with a fresh module's train-mode call on x from the same global RNG
    state (eval calls draw no random numbers, so even a private generator is where a fresh module's is).
    Train then eval: train calls at the other shape and on x', then eval on x, compared with the fresh
    module's eval output; a module that takes a padding mask also gets a left-padded eval call of x's shape
    last (``_padded_call``). A cache keyed by shape (K/V, masks), a mask sized by the first call, a cache
    not cleared when switching to train, a dropout mask kept from train mode and reapplied in eval, or a
    padding mask kept shows as a difference; so does a path taken only after WARM_CALLS calls of a shape (``_cheap_to_warm``), and a
    state kept from a first call in bfloat16 (``_after_a_lower_precision_call``)."""
    x = case.input()
    fresh = _fresh_with_parameters_of(case, case.module)
    expected = case.forward(x, module=fresh)
    expected_train = case.forward(x, train=True, module=fresh, seed_salt=9)
    other_tokens, other_batch = _other_shape(case)
    other, same_shape = case.input(salt=2, num_tokens=other_tokens, batch=other_batch), case.input(salt=3)
    if (case.cfg.seed >> 2) % 2:  # x with its last token changed: a cache keyed on a prefix of the tokens shows
        same_shape = torch.cat([x[..., :-1, :], same_shape[..., -1:, :]], dim=-2)

    def after(history, train):
        for i, (before, before_train, mask) in enumerate(history):
            case.forward(before, train=before_train, seed_salt=i + 1, attention_mask=mask)
        calls = ", ".join(f"{'train' if t else 'eval'} {tuple(b.shape)}{'' if m is None else ' left-padded'}"
                          for b, t, m in history)
        return case.forward(x, train=train, seed_salt=9), f"after calls [{calls}]"

    trained, calls = after([(other, False, None), (same_shape, False, None)], train=True)
    try:
        assert_close(trained, expected_train, dtype=x.dtype, what=f"train-mode output {calls} vs a fresh module's")
    except Violation:
        # Judge only a module whose train mode is a function of the global RNG: another fresh module agrees.
        again = case.forward(x, train=True, module=_fresh_with_parameters_of(case, case.module), seed_salt=9)
        if torch.equal(again, expected_train):
            raise
    evaluated, calls = after([(other, True, None), (same_shape, True, None), *_padded_call(case, same_shape)], train=False)
    assert_close(evaluated, expected, dtype=x.dtype, what=f"eval output {calls} vs a fresh module's")
    if _cheap_to_warm(case, x):  # then many calls of x's shape, where a path taken once it is warm shows
        case.seed(case.cfg.seed)
        with case.autograd_mode(), torch.no_grad():  # (the example's mode; the outputs are not used: no graphs, no checks)
            for i in range(WARM_CALLS):
                case.guard(f"eval call {i + 1} of {WARM_CALLS} more of x's shape", case.module, x)
        assert_close(case.forward(x), expected, dtype=x.dtype, what=f"eval output after {WARM_CALLS} more calls of x's "
                                                                     f"shape vs a fresh module's (a path taken once a shape is warm)")
    _after_a_lower_precision_call(case, x)


def _cheap_to_warm(case, x):
    """Whether history-independent makes WARM_CALLS more calls of x's shape in this example: x of <= 32 tokens and
    <= 64 in all, a module of <= 64 features and <= 8 heads. A path switched once a shape is warm does not depend on
    the size; examples of these sizes are about half of those drawn, and their calls are cheap."""
    return (x.shape[-2] <= 32 and x.numel() // x.shape[-1] <= 64 and case.cfg.d_out <= 64 and case.cfg.d_in <= 64
            and case.cfg.num_heads <= 8)


def _padded_call(case, x):
    """[(x, eval, a left padding mask of half the tokens)] for a module that takes a padding mask
    (``forward(x, attention_mask=m)``) and x of 2 tokens or more, else []: a mask cached by shape and then
    combined with the padding in place keeps masking those keys in later calls without padding."""
    T = x.shape[-2]
    if T < 2 or case.kind.name not in PADDING_KINDS or not case.takes_attention_mask():
        return []
    real = torch.arange(T, device=x.device)[None].expand(x.shape[0], T) >= T // 2
    return [(x, False, real)]


def after_a_first_call_in_bfloat16(case, x, first_call):
    """A fresh module with the case's parameters after module.to(bfloat16), ``first_call(module, x in bfloat16)`` and
    module.to(x's dtype) (what each ``to`` returns, when it is a module); None in bfloat16 itself, or where the call in
    bfloat16 fails (unsupported, or wrong there: the other invariants' finding). The ``to`` calls are guarded module
    code: one that raises fails the invariant."""
    low = torch.bfloat16
    if x.dtype == low:
        return None
    module = _fresh_with_parameters_of(case, case.module)
    module = _converted(module, case.guard("module.to(torch.bfloat16)", module.to, low))
    try:
        first_call(module, x.to(low))
    except Violation:
        return None
    return _converted(module, case.guard(f"module.to({x.dtype})", module.to, x.dtype))


def _converted(module, returned):
    """What module.to(...) returned when it is a module (nn.Module.to returns the module itself), else the module."""
    return returned if isinstance(returned, torch.nn.Module) else module


def _after_a_lower_precision_call(case, x):
    """A fresh module's first call in bfloat16 (module.to(bfloat16), forward, module.to back) leaves no trace:
    its next output in x's dtype equals that of a module given the same (rounded) parameters and floating
    buffers (a rotary table or a float mask is rounded by the round trip too) and never called. A cache
    built at the first call and kept in that call's precision (Hugging Face's former rotary cos/sin cache)
    shows. Skipped in bfloat16 itself and where the module does not run in bfloat16."""
    module = after_a_first_call_in_bfloat16(case, x, lambda module, low_x: case.forward(low_x, module=module))
    if module is None:
        return
    never_called = _fresh_with_parameters_of(case, module)
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, b in never_called.named_buffers():
            source = buffers.get(name)
            if source is not None and b.is_floating_point() and source.shape == b.shape:
                b.copy_(source)
    assert_close(case.forward(x, module=module), case.forward(x, module=never_called), dtype=x.dtype,
                 what=f"output after a first call in bfloat16 (module.to(bfloat16), forward, module.to({x.dtype})) vs "
                      f"a module with the same parameters never called")


@invariant("parameter-update-respected",
           "after its parameters change in place (load_state_dict, with assign=True too, an optimizer step on every "
           "parameter, then on one alone; through .data too), forward equals a fresh module's given the same "
           "parameters; so does a copy.deepcopy of it after the original's change",
           ALL_KINDS, "forward")
def parameter_update_respected(case):
    """The module is called (eval and train) first, so anything computed lazily at the first call exists;
    then (1) ``load_state_dict`` of a module built from another seed (for half the seeds with assign=True, which
    puts new Parameter objects in place: a module that kept its weights in a plain list goes stale), (2) an in-place step
    p += 0.5 rms(p) N(0, 1) on every parameter, as an optimizer does, (3) the same step on one parameter
    tensor only, chosen by the seed (a LoRA merge into the value projection, ``load_state_dict(strict=False)``
    of a part: a fused-weight cache that watches some parameters' versions only). For half the seeds the steps
    write through ``p.data`` (an EMA or weight average does), which leaves ``p._version`` where it was: a cache
    refreshed when the version counter moves goes stale. After each, forward(x) must equal that of a module built
    afresh with those parameters (set before its first call). A ``copy.deepcopy`` of the module made before its
    first call (an EMA or teacher model) must then still compute with its own parameters: a projection held in a
    closure over the original (a lambda, a bound method kept as an attribute) shows. Where deepcopy itself raises,
    that part is skipped."""
    x, module = case.input(), case.module
    try:
        copied = case.guard("copy.deepcopy(module)", copy.deepcopy, module)
    except Violation:
        copied = None
    case.forward(x)
    case.forward(x, train=True)
    other = case.build(seed=case.cfg.seed + 1)
    assign = (case.cfg.seed >> 4) % 2 == 1
    state = {k: v.clone() for k, v in other.state_dict().items()} if assign else other.state_dict()
    loading = "load_state_dict(assign=True)" if assign else "load_state_dict"
    with case.autograd_mode():  # (a buffer a forward made under inference mode is written only there)
        case.guard(loading, module.load_state_dict, state, **({"assign": True} if assign else {}))
    assert_close(case.forward(x), case.forward(x, module=other), dtype=x.dtype,
                 what=f"output after {loading} of another module's state vs that module's output")
    generator = torch.Generator().manual_seed(case.cfg.seed)
    floating = [(name, p) for name, p in module.named_parameters()  # what an optimizer steps (frozen: buffers)
                if p.is_floating_point() and p.requires_grad]

    through_data = (case.cfg.seed >> 3) % 2 == 1  # EMA, weight averaging: p.data written, p's version counter unmoved

    def step(params, what):
        what += " through .data" if through_data else ""
        with torch.no_grad():
            for _, p in params:
                rms = p.double().pow(2).mean().sqrt().item() if p.numel() else 0.0
                (p.data if through_data else p).add_(
                    (torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5 * (rms or 1.0)).to(p))
        assert_close(case.forward(x), case.forward(x, module=_fresh_with_parameters_of(case, module)), dtype=x.dtype,
                     what=f"output after an in-place step on {what} vs a fresh module given those parameters")

    step(floating, "every parameter")
    if isinstance(copied, torch.nn.Module):
        assert_close(case.forward(x, module=copied), case.forward(x, module=_fresh_with_parameters_of(case, copied)),
                     dtype=x.dtype, what="output of a copy.deepcopy of the module (made before its first call), after "
                                         "the original's parameters changed, vs a fresh module given the copy's parameters")
    if len(floating) > 1:
        name, p = floating[case.cfg.seed % len(floating)]
        step([(name, p)], f"{name!r} alone")


def _replicated(case, needed):
    """The example's input repeated along the batch so that it has at least ``needed`` attention rows
    (batch x heads x num_tokens), and that number of rows."""
    x = case.input()
    rows = x.shape[0] * case.kind.attention_heads(case.cfg) * x.shape[-2]
    replicas = min(MAX_REPLICAS, max(1, math.ceil(needed / rows)))
    return x.repeat(replicas, 1, 1), rows * replicas


def _rows_needed(probability_per_row):
    """Rows n such that probability_per_row ** n <= FALSE_ALARM."""
    return math.ceil(math.log(FALSE_ALARM) / math.log(probability_per_row))


def _droppable(case, x, evaluated):
    """The size of what dropout can change in ``evaluated``: the output, or for a block the sub-layers'
    part of it (the residual stream carries x through untouched). NotApplicable (this example) when it
    is 0: e.g. a block with emb_dim 1, where LayerNorm outputs its shift and zero-initialized biases
    (Hugging Face) make both sub-layers output 0 in every mode."""
    part = evaluated - x if case.kind.structure == "block" else evaluated
    scale = part.abs().max().item()
    if not scale > 0:
        raise NotApplicable("the output does not depend on the attention weights in this example", structural=False)
    return scale


@invariant("train-differs-from-eval",
           "train mode at dropout p > 0 changes the output (after an eval call): dropout is applied",
           DROPOUT_KINDS, "forward", dropouts=NONZERO_DROPOUTS, dtypes=("float32", "float64"))
def train_differs_from_eval(case):
    """Inverted dropout changes every row of the weights that it touches: a kept weight becomes w/(1-p),
    a dropped one 0, so train == eval needs every weight of every row kept AND no rescaling, which
    inverted dropout never gives; with the rescaling left out of account the chance is at most
    (1-p)^n over n attention rows (each row has a positive weight: its max), made <= FALSE_ALARM by
    batch replicas of the input. A module that ignores its dropout (litgpt; dropout_p=0 passed to
    scaled_dot_product_attention in train mode) fails."""
    p = case.cfg.dropout
    if p == 0:
        raise NotApplicable("needs dropout > 0")
    x, rows = _replicated(case, _rows_needed(1 - p))
    if (1 - p) ** rows > FALSE_ALARM:
        raise NotApplicable(f"dropout={p} is too small to test with {MAX_REPLICAS} replicas")
    evaluated = case.forward(x)
    trained = case.forward(x, train=True, seed_salt=1)
    if (trained - evaluated).abs().max().item() <= allowed_error(x.dtype, _droppable(case, x, evaluated)):
        raise Violation(f"train mode at dropout={p} gives the eval output (input of {tuple(x.shape)}, {rows} "
                        f"attention rows; a correct module does so with probability < {FALSE_ALARM:g}): "
                        f"dropout is never applied")


@invariant("train-masks-vary",
           "two consecutive train-mode calls at dropout p > 0 (the RNG going on, as between training steps) give "
           "different outputs (new masks each call), and the same output from the same RNG state (masks drawn from "
           "torch's RNG)",
           DROPOUT_KINDS, "forward", dropouts=NONZERO_DROPOUTS, dtypes=("float32", "float64"))
def train_masks_vary(case):
    """The first call seeds the global RNG from cfg.seed + 1; the second goes on from where the first left it, as
    a training step does after another, so a generator seeded in forward from anything that does not advance
    (a fixed seed, torch.initial_seed()) repeats its mask and fails. Two independent masks agree on a weight with probability p^2 + (1-p)^2; on the max weight of each of
    n rows, with (p^2 + (1-p)^2)^n <= FALSE_ALARM (batch replicas). Dropping a row's max weight (>= 1/T)
    changes the row by far more than rounding. A generator reseeded to a fixed seed in forward fails. A third
    call from the first call's RNG state must repeat its output: a private torch.Generator (masks that
    torch.manual_seed neither reproduces nor varies; activation checkpointing recomputes another mask) fails."""
    p = case.cfg.dropout
    if p == 0:
        raise NotApplicable("needs dropout > 0")
    agree = p * p + (1 - p) ** 2
    x, rows = _replicated(case, _rows_needed(agree))
    if agree ** rows > FALSE_ALARM:
        raise NotApplicable(f"dropout={p} is too small to test with {MAX_REPLICAS} replicas")
    first = case.forward(x, train=True, seed_salt=1)
    second = case.forward(x, train=True, seed_salt=None)
    allowed = allowed_error(x.dtype, _droppable(case, x, case.forward(x)))
    if (second - first).abs().max().item() <= allowed:
        raise Violation(f"two consecutive train-mode calls at dropout={p} (the RNG going on between them) give the same output "
                        f"(input of {tuple(x.shape)}, {rows} attention rows; a correct module does so with "
                        f"probability < {FALSE_ALARM:g}): every call drops the same positions")
    again = case.forward(x, train=True, seed_salt=1)
    if (again - first).abs().max().item() > allowed:
        raise Violation(f"two train-mode calls at dropout={p} from the same global RNG state (torch.manual_seed) give "
                        f"different outputs: dropout does not draw from torch's RNG (a private generator?), so a "
                        f"seed does not reproduce a run and activation checkpointing recomputes another mask")
