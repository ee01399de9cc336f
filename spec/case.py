"""One example: a target built from one configuration, and guarded calls into the module.

Everything the module under test does runs through ``guard``: an exception (any BaseException), a
hang past the time limit, or a wrong return type becomes a Violation naming the call, never a crash
of the harness; the process-wide state a module can change (torch's grad mode, default dtype and
device, threads, RNG, function modes; cwd, sys.stdout/stderr, warnings filters, signal handlers and
mask) is restored after every call, so one target cannot break the checks of the next. Outputs are
copied into plain tensors before anything compares them. The module is built once per example.

The timer is a SIGALRM in this process: enough for a well-behaved module. `attnspec check` also runs
every target in a worker process (spec/supervisor.py) that reports each call through ``set_monitor``,
so a module that blocks or swallows the alarm is killed from outside.
"""

import _signal  # signal's C core: the same calls without the enum conversions (~10x faster per call)
import contextlib
import inspect
import io
import itertools
import math
import os
import signal
import sys
import threading
import warnings
from functools import cached_property

import torch

from attnspec.errors import InternalError, NotApplicable, Unsupported, Violation
from attnspec.probe import AttentionProbe
from attnspec.variants import contract

CALL_TIME_LIMIT_S = 10.0  # one constructor or forward call; overridable with --time-limit
MESSAGE_CHARS = 2000  # a module's exception message is cut to this length

_monitor = None  # worker processes: called with (what, cfg) before each call into the module, (None, None) after


def set_monitor(fn):
    global _monitor
    _monitor = fn


class _Timeout(BaseException):  # BaseException: a module's `except Exception` cannot swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    """SIGALRM after ``seconds`` (main thread only). On the way out the alarm is cancelled, one the
    module left pending (blocked) is discarded, and the signal mask and handler are restored."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Timeout()

    mask = _signal.pthread_sigmask(signal.SIG_BLOCK, ())
    previous = _signal.signal(signal.SIGALRM, expire)
    _signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _signal.setitimer(signal.ITIMER_REAL, 0)
        _signal.signal(signal.SIGALRM, _signal.SIG_IGN)  # discards a pending alarm (POSIX)
        if _signal.pthread_sigmask(signal.SIG_BLOCK, ()) != mask:
            _signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _signal.signal(signal.SIGALRM, previous if previous is not None else _signal.SIG_DFL)


def clean_text(text):
    """``text`` safe to write anywhere: lone surrogates backslash-escaped, cut to MESSAGE_CHARS."""
    text = text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(exc, time_limit=None, with_type=True):
    """``Type: message`` (``with_type=False``: the message) of an exception raised by module code, even if its
    ``__str__`` raises or hangs."""
    try:
        name = type(exc).__name__ if isinstance(type(exc).__name__, str) else "exception"
    except BaseException:
        name = "exception"
    try:
        with _time_limit(time_limit):
            message = str(exc)
        if not isinstance(message, str):
            raise TypeError
    except _Timeout:
        message = f"<its message did not format within {time_limit:g} s>"
    except BaseException:
        message = "<its message cannot be formatted>"
    if not with_type:
        return clean_text(message)
    return clean_text(f"{name}: {message}" if message else name)


def _default_device_context():
    return getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)


def _modes():
    return torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack(), _default_device_context()


def _restore_modes(saved):
    """Pop the torch function and dispatch modes a call left pushed (``set_default_device`` pushes one; an
    entered ``TorchDispatchMode`` or ``FakeTensorMode`` would rewrite every later op, attnspec's comparisons
    included) and put the default device back."""
    functions, dispatch, context = saved
    while torch._C._len_torch_function_stack() > functions:
        torch._C._pop_torch_function_stack()
    while torch._C._len_torch_dispatch_stack() > dispatch:
        torch._C._pop_torch_dispatch_stack(None)  # user modes first, then infra modes (fake, proxy)
    torch._GLOBAL_DEVICE_CONTEXT.device_context = context


def _cwd():
    try:
        return os.getcwd()
    except OSError:  # deleted
        return None


def _restore_cwd(saved):
    if saved is not None and _cwd() != saved:
        change_dir(saved)


def change_dir(path):
    """Back to ``path``; if the module deleted it, to its nearest existing ancestor."""
    while path:
        try:
            return os.chdir(path)
        except OSError:
            if path == os.path.dirname(path):
                return
            path = os.path.dirname(path)


def _if_changed(get, set):
    """(save, restore) that only calls the setter when the value changed (some setters cost ~1 ms)."""
    return get, lambda saved: None if get() == saved else set(saved)


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def _signal_handlers():
    return [(s, _signal.getsignal(s)) for s in _HANDLED_SIGNALS]


def _set_signal_handlers(saved):
    for s, handler in saved:
        if handler is not None and _signal.getsignal(s) is not handler:
            _signal.signal(s, handler)


def _set_streams(saved):
    sys.stdout, sys.stderr, sys.stdin = saved


# Process-wide state a module can change, as (save, restore) pairs: saved before every call into the
# module and restored after it. Signal handlers only in the main thread (Python's rule).
_STATE = [
    (sys.getrecursionlimit, sys.setrecursionlimit),  # first: a module may leave it at its own call depth
    # then the modes: a torch function or dispatch mode left pushed would intercept the torch calls of every restore below
    (_modes, _restore_modes),
    _if_changed(torch.is_grad_enabled, torch.set_grad_enabled),
    _if_changed(torch.get_default_dtype, torch.set_default_dtype),
    _if_changed(torch.get_num_threads, torch.set_num_threads),
    _if_changed(torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    _if_changed(lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
                lambda s: torch.use_deterministic_algorithms(s[0], warn_only=s[1])),
    (torch.get_rng_state, torch.set_rng_state),  # (Python's random: Hypothesis resets it for every example)
    (_cwd, _restore_cwd),
    (lambda: (sys.stdout, sys.stderr, sys.stdin), _set_streams),
]
_MAIN_THREAD_STATE = [(_signal_handlers, _set_signal_handlers)]


@contextlib.contextmanager
def restored_state():
    """Run the block, then put back every piece of process-wide state in ``_STATE`` (and CUDA's RNG
    if CUDA is in use) and the warnings filters."""
    pairs = list(_STATE)
    if threading.current_thread() is threading.main_thread():
        pairs += _MAIN_THREAD_STATE
    if torch.cuda.is_initialized():
        pairs.append((torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))
    saved = [(save(), restore) for save, restore in pairs]
    try:
        with warnings.catch_warnings():
            yield
    finally:
        for value, restore in saved:
            restore(value)


class _UserInterrupt:
    """While a module runs in the main thread with Python's default SIGINT handler (the pytest plugin),
    record a real Ctrl-C so it is re-raised, not blamed on the module. Workers ignore SIGINT: there a
    KeyboardInterrupt can only come from the module."""

    def __init__(self):
        self.seen = False

    def __enter__(self):
        self.active = (threading.current_thread() is threading.main_thread()
                       and _signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.active:
            _signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.active:
            _signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _reported(what, cfg):
    if _monitor:
        _monitor(str(what), cfg)
    try:
        yield
    finally:
        if _monitor:
            _monitor(None, None)


class _Step:
    """What a guarded call is doing now (its str), for the message if it fails there."""

    def __init__(self, now):
        self.now = now

    def __str__(self):
        return self.now


def _layout(t):
    """(shape, strides, storage offset, dtype, device) of a tensor: what in-place metadata changes move."""
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device


def _described_layout(layout):
    shape, strides, offset, dtype, device = layout
    return f"shape {shape}, strides {strides}, storage offset {offset}, {str(dtype).replace('torch.', '')} on {device}"


def _plain_copy(t):
    """A plain torch.Tensor copy of ``t`` (autograd graph kept), bypassing a subclass's __torch_function__."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.clone()


# Case.inference's modes: the context each forward runs in.
AUTOGRAD_MODES = {None: contextlib.nullcontext, "torch.no_grad()": torch.no_grad,
                  "torch.inference_mode()": torch.inference_mode}


class Case:
    """A target and a configuration; ``module`` is built on first use (eval mode, seeded)."""

    def __init__(self, target, cfg, time_limit=None, stdout_sink=None):
        self.target, self.cfg, self.kind = target, cfg, target.kind
        self.variants = getattr(target, "variants", ())  # contract variants checked (spec.variants)
        self.contract = contract(self.variants)
        self.time_limit = CALL_TIME_LIMIT_S if time_limit is None else time_limit
        self.stdout_sink = stdout_sink  # list collecting what modules printed
        self.returned = None  # the plain tensor the last forward returned, as returned (forward returns a copy), or None
        self.rng_after = None  # the RNG's state as the module left it in the last forward (``seed_salt=None`` goes on)

    def guard(self, what, fn, *args, **kwargs):
        """Call module code: its exceptions, hangs and prints are reported, not propagated, and the
        global state it changed is restored. Violation/NotApplicable/Unsupported pass through (an
        adapter's verdicts)."""
        buffer = io.StringIO()
        try:
            with _reported(what, self.cfg), restored_state(), _UserInterrupt() as interrupt:
                try:
                    with _time_limit(self.time_limit), contextlib.redirect_stdout(buffer):
                        return fn(*args, **kwargs)
                except (Violation, NotApplicable, Unsupported, InternalError):  # InternalError: our hooks/probe
                    raise
                except _Timeout:
                    message = f"{what} did not return within {self.time_limit:g} s"
                except BaseException as e:  # SystemExit, KeyboardInterrupt, GeneratorExit...: the module's
                    if interrupt.seen:
                        raise
                    message = f"{what} raised {describe(e, self.time_limit)}"
        finally:
            if buffer.getvalue() and self.stdout_sink is not None:
                self.stdout_sink.append(buffer.getvalue())
        raise Violation(message)

    def build(self, seed=None):
        """A fresh module, constructed after torch.manual_seed(seed or cfg.seed), in eval mode."""
        self.seed(self.cfg.seed if seed is None else seed)
        step = _Step("the constructor")

        def construct():  # one guarded call: the constructor, then module.eval() if it is a module
            module = self.target.adapter.build(self.cfg)
            if isinstance(module, torch.nn.Module) and self._placed(module):
                step.now = "module.eval()"
                module.eval()
            return module

        module = self.guard(step, construct)
        if not isinstance(module, torch.nn.Module):
            raise Violation(f"the constructor returned {type(module).__name__}, not a torch.nn.Module")
        if step.now != "module.eval()":  # not in place yet: moved, then eval
            module = self.guard("moving the module (module.to)", module.to, device=self.cfg.device,
                                dtype=self.cfg.torch_dtype)
            if not isinstance(module, torch.nn.Module):
                raise Violation(f"module.to(device, dtype) returned {type(module).__name__}, not the module")
            self.guard("module.eval()", module.eval)
        return module

    def _placed(self, module):
        """Whether ``module.to(device, dtype)`` would change nothing: torch's own ``to``/``_apply`` everywhere,
        every floating-point tensor already in the dtype and every tensor on the device (the common
        float32-on-CPU case; the call costs ~0.5 ms for a small module)."""
        if any(type(m).to is not torch.nn.Module.to or type(m)._apply is not torch.nn.Module._apply
               for m in module.modules()):
            return False
        dtype, device = self.cfg.torch_dtype, torch.device(self.cfg.device)
        return all(t.device == device and (t.dtype == dtype or not (t.is_floating_point() or t.is_complex()))
                   for t in itertools.chain(module.parameters(), module.buffers()))

    def seed(self, seed):
        """torch.manual_seed(seed); on the CPU only the CPU generator (torch.manual_seed also seeds
        every uninitialized accelerator backend, formatting a stack trace each: ~5 ms a call)."""
        if self.cfg.device == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def _rng(self):
        """The state of the generators a module on cfg.device draws from (the CPU's, and the device's)."""
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.cfg.device) if self.cfg.device != "cpu" else None)

    def _set_rng(self, state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cfg.device)

    @cached_property
    def module(self):
        return self.build()

    def takes_attention_mask(self):
        """Whether the module's forward has an ``attention_mask`` parameter (the padding convention)."""
        try:
            return "attention_mask" in inspect.signature(self.module.forward).parameters
        except (TypeError, ValueError):  # no signature to read: a C function or an odd callable
            return False

    def input(self, salt=0, num_tokens=None, batch=None):
        return self.cfg.random_input(self.kind.input_shape(self.cfg, num_tokens, batch), salt)

    def inference(self, train=False, needs_grad=False):
        """The autograd mode a forward runs in, as inference runs it: for odd seeds, unless the caller
        differentiates the output, ``torch.no_grad()`` (seed % 4 == 1) or ``torch.inference_mode()``
        (seed % 4 == 3); in train mode too (Monte Carlo dropout samples train-mode forwards without
        autograd). None: autograd on. Real code branches on autograd (PyTorch's own nn.MultiheadAttention
        takes a fused fast path only without it; a dropout gated on torch.is_grad_enabled() is skipped; a
        serving path checks torch.is_inference_mode_enabled()), and every path must agree."""
        if needs_grad or self.cfg.seed % 2 == 0:
            return None
        return "torch.no_grad()" if self.cfg.seed % 4 == 1 else "torch.inference_mode()"

    def autograd_mode(self):
        """The context of ``inference()``'s mode, for calls beside forward (reset_cache, load_state_dict): a
        buffer a forward made under torch.inference_mode() can be changed in place only under it."""
        return AUTOGRAD_MODES[self.inference()]()

    def forward(self, x, train=False, module=None, seed_salt=0, needs_grad=False, attention_mask=None):
        """module(x) in eval or train mode (for odd seeds under torch.no_grad() or torch.inference_mode():
        ``inference``); must be a plain strided Tensor of the kind's output shape on x's device (a tensor subclass is
        copied into a plain tensor first). The global RNG is seeded from the config first, so every
        call is reproducible (even a module that draws random numbers in eval mode); ``seed_salt=None``: not reseeded,
        the RNG goes on from where the previous call left it (as from one training step to the next). Returns a copy: a
        module may reuse its output buffer. ``attention_mask`` (batch, num_tokens) bool, True at real tokens:
        called as module(x, attention_mask=...); outputs at padded positions may be anything, NaN included."""
        module = self.module if module is None else module
        if seed_salt is not None:
            self.seed(self.cfg.seed + seed_salt)
        elif self.rng_after is None:
            raise InternalError("Case.forward(seed_salt=None) before any forward of this case: no RNG state to go on from")
        else:  # (each call's state changes are undone afterwards, the RNG's included: put back where the last forward,
            self._set_rng(self.rng_after)  # of whichever module, left it)
        self.returned = None
        step = _Step("forward")
        autograd = AUTOGRAD_MODES[self.inference(train, needs_grad)]()

        def call():  # one guarded call (each costs ~0.1 ms): the mode switches and forward
            try:
                step.now = "module.train()"
                if train or any(m.training for m in module.modules()):  # (train() sets every submodule's flag)
                    module.train(train)
                step.now = "forward"
                out = module(x) if attention_mask is None else module(x, attention_mask=mask)
                self.rng_after = self._rng()
                if train:  # back to eval mode, where a module is kept between calls
                    step.now = "module.eval()"
                    module.eval()
                return out
            except (Unsupported, NotApplicable) as e:  # an adapter's build() may decline a configuration; the
                raise RuntimeError(f"attnspec's {type(e).__name__} ({e}): only an adapter's build() may decline a "
                                   f"configuration") from None  # module's calls may not

        layout = _layout(x)  # (what x is, for the checks below, whatever forward does to it)
        mask = None if attention_mask is None else attention_mask.clone()  # (ours stays ours)
        with autograd:  # outside the guard: its restore pops whatever mode the module pushed before no_grad exits
            out = self.guard(step, call)
        if _layout(x) != layout:
            raise Violation(f"forward changed its input's shape or layout in place (resize_, transpose_, set_...): "
                            f"{_described_layout(layout)} before the call, {_described_layout(_layout(x))} after")
        if mask is not None and not torch.equal(mask, attention_mask):
            raise Violation("forward changed the attention_mask it was given in place: the caller's padding mask is "
                            "no longer what it passed")
        subclass = type(out)
        if subclass is torch.Tensor:  # a copy: a module may reuse its output buffer (eval-deterministic checks it does not)
            self.returned, out = out, out.clone()
        elif isinstance(out, torch.Tensor):  # the subclass's own code runs here: guarded
            if subclass.__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:  # (values: whatever each op says)
                raise Violation(f"forward returned a {subclass.__qualname__}, a tensor subclass with its own "
                                f"__torch_dispatch__: its values cannot be read as a plain tensor's")
            out = self.guard("copying forward's output", _plain_copy, out)
        if not isinstance(out, torch.Tensor):
            raise Violation(f"forward returned a {subclass.__module__}.{subclass.__qualname__}, expected a torch.Tensor")
        if type(out) is not torch.Tensor:
            raise Violation(f"forward returned a {subclass.__qualname__} that does not convert to a plain torch.Tensor")
        if out.layout != torch.strided or out.is_nested or out.device != x.device:
            raise Violation(f"forward returned a {'nested' if out.is_nested else out.layout} tensor on device "
                            f"{out.device}, expected a strided tensor on {x.device}")
        expected = self.kind.output_shape(self.cfg, num_tokens=x.shape[-2], batch=x.shape[0] if self.kind.batched else None)
        if tuple(out.shape) != expected:
            raise Violation(f"forward returned shape {tuple(out.shape)}, expected {expected} for input {tuple(x.shape)}")
        if out.is_floating_point() and not torch.isfinite(out).all():  # (the details only then)
            self._check_finite(out, x, train, needs_grad, attention_mask)
        return out

    def _check_finite(self, out, x, train, needs_grad, attention_mask):
        """Violation if ``out`` has a non-finite value at a real token (``attention_mask``) for a finite ``x``."""
        bad = ~torch.isfinite(out)
        if attention_mask is not None:  # outputs at real tokens only
            bad = bad & attention_mask.bool().reshape(*attention_mask.shape, *([1] * (out.dim() - 2)))
        if bad.any() and torch.isfinite(x).all():
            index = tuple(int(i) for i in bad.nonzero()[0])
            inference = self.inference(train, needs_grad)
            mode = ("train" if train else "eval") + (f", {inference}" if inference else "")
            raise Violation(f"forward returned output[{index}] = {out[index].item()} for a finite input "
                            f"(scale {self.cfg.scale:g}, offset {self.cfg.offset:g}, {mode} mode; every invariant "
                            f"requires a finite output, as finite-output states)")

    def observe(self, x, train=False, module=None, attention_mask=None):
        """(output, Observation); NotApplicable if no attention softmax is seen."""
        probe = AttentionProbe(x.shape[-2])
        with probe:
            out = self.forward(x, train=train, module=module, attention_mask=attention_mask)
        if probe.error is not None:  # raised inside forward, even if the module swallowed it
            raise probe.error
        if not probe.observation.heads:
            raise NotApplicable("attention weights are not observable (no softmax over num_tokens keys, no "
                                "scaled_dot_product_attention or multi_head_attention_forward call)", structural=False)
        T, heads = x.shape[-2], self.kind.attention_heads(self.cfg)
        folded = next((h for h in probe.observation.heads if h.rows_axis is not None), None)
        if folded:  # an axis of num_tokens was taken for the queries (the K/V heads, the batch), wrongly
            raise NotApplicable(f"the softmax output {tuple(folded.raw_weights.shape)} is multiplied into the values "
                                f"with {folded.raw_weights.shape[folded.rows_axis]} rows per matrix, not {T} queries "
                                f"(queries folded with another axis?): its query axis is not observable", structural=False)
        expected = math.prod(x.shape[:-2]) * heads * T * T
        seen = sum(h.raw_weights.numel() for h in probe.observation.heads)
        if seen != expected:  # softmax calls over num_tokens keys that are not the whole attention (one per query row...)
            raise NotApplicable(f"the softmax calls over {T} keys hold {seen} weights, not the {expected} of "
                                f"(batch, {heads} heads, {T} queries, {T} keys): attention weights not observable as such",
                                structural=False)
        return out, probe.observation

    def projections(self, module=None):
        module = self.module if module is None else module
        parts = self.guard("the adapter's projections()", self.target.adapter.projections, module)
        if parts is None:
            from attnspec.targets import projection_layout  # (targets imports this module)

            why = projection_layout(self.target.adapter, module)
            raise NotApplicable("the projections are not found (" + (why if why not in ("not found", "the adapter's "
                                "projections()") else "no W_query/W_key/W_value") + "; an adapter can name them)")
        parts = self._reading(module, parts)
        problem = self.kind.projection_problem(self.cfg, parts)
        if problem:
            raise NotApplicable(problem)
        return parts

    def _reading(self, module, parts):
        """Where the layout alone cannot tell how the parameters are read (a fused q/k/v per head or in thirds, a
        bare 2-D Parameter (in, out) or (out, in), a feed-forward's two Linears; ``targets.readings``), the one of
        those that fit the configuration under which the float64 oracle is closest to the module's own eval
        output on this case's input. Every reading is a legitimate parametrization of attention, so a wrong
        module fails under each; only an adapter's own projections() are taken as given."""
        from attnspec import oracle
        from attnspec.targets import Adapter, readings  # (targets imports this module)

        if getattr(self.target.adapter.projections, "__func__", None) is not Adapter.projections:
            return parts
        fitting = [p for p in [parts, *readings(module, parts, self.kind.oracle_heads(self.cfg)[0])]
                   if not self.kind.projection_problem(self.cfg, p)]
        if len(fitting) < 2:
            return fitting[0] if fitting else parts
        if getattr(self, "_reading_index", None) is None:
            x = self.input()
            out = self.forward(x, module=module).double()

            def error(candidate):
                try:
                    ref = oracle.reference(self.kind, self.cfg, candidate, x, gelu=self.contract.gelu)
                    return (out - ref).abs().max().item() if ref.shape == out.shape else math.inf
                except RuntimeError:  # (shapes that do not chain: not this module's reading)
                    return math.inf

            errors = [error(p) for p in fitting]
            self._reading_index = min(range(len(fitting)), key=lambda i: (errors[i], i))
        return fitting[min(self._reading_index, len(fitting) - 1)]
