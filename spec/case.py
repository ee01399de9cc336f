"""One example: a target built from one configuration, and guarded calls into the module.

Everything the module under test does runs through ``guard``: an exception, a hang past the time
limit, or a wrong return type becomes a Violation naming the call, never a crash of the harness.
The module is built once per example; each check reuses it.
"""

import contextlib
import io
import signal
import threading
from functools import cached_property

import torch

from attnspec.errors import NotApplicable, Unsupported, Violation
from attnspec.probe import AttentionProbe

CALL_TIME_LIMIT_S = 10.0  # one constructor or forward call; overridable with --time-limit


def seed_rng(seed, device):
    """torch.manual_seed(seed) for the generators a module on ``device`` can use. torch.manual_seed
    itself also queues a seed for every lazy accelerator, formatting a stack trace each time (~1 ms
    a call on a CPU-only machine: a third of attnspec's run time at small sizes)."""
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type != "cpu":
        torch.manual_seed(seed)


class _Timeout(BaseException):  # BaseException: a module's `except Exception` cannot swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Case:
    """A target and a configuration; ``module`` is built on first use (eval mode, seeded)."""

    def __init__(self, target, cfg, time_limit=None, stdout_sink=None):
        self.target, self.cfg, self.kind = target, cfg, target.kind
        self.time_limit = CALL_TIME_LIMIT_S if time_limit is None else time_limit
        self.stdout_sink = stdout_sink  # list collecting what modules printed

    def guard(self, what, fn, *args, **kwargs):
        """Call module code: its exceptions, hangs and prints are reported, not propagated."""
        buffer = io.StringIO()
        try:
            with _time_limit(self.time_limit), contextlib.redirect_stdout(buffer):
                return fn(*args, **kwargs)
        except (Violation, NotApplicable, Unsupported):
            raise
        except _Timeout:
            raise Violation(f"{what} did not return within {self.time_limit:g} s") from None
        except (Exception, SystemExit) as e:  # sys.exit() in a module must not end the harness
            raise Violation(f"{what} raised {type(e).__name__}: {e}") from None
        finally:
            if buffer.getvalue() and self.stdout_sink is not None:
                self.stdout_sink.append(buffer.getvalue())

    def build(self, seed=None):
        """A fresh module, constructed after torch.manual_seed(seed or cfg.seed), in eval mode."""
        seed_rng(self.cfg.seed if seed is None else seed, self.cfg.device)
        module = self.guard("the constructor", self.target.adapter.build, self.cfg)
        if not isinstance(module, torch.nn.Module):
            raise Violation(f"the constructor returned {type(module).__name__}, not a torch.nn.Module")
        module = self.guard("moving the module", module.to, device=self.cfg.device, dtype=self.cfg.torch_dtype)
        return module.eval()

    @cached_property
    def module(self):
        return self.build()

    def input(self, salt=0, num_tokens=None, batch=None):
        return self.cfg.random_input(self.kind.input_shape(self.cfg, num_tokens, batch), salt)

    def forward(self, x, train=False, module=None, seed_salt=0):
        """module(x) in eval or train mode; must be a Tensor of the kind's output shape. The global RNG
        is seeded from the config first, so every call is reproducible (even a module that draws
        random numbers in eval mode)."""
        module = self.module if module is None else module
        module.train(train)
        seed_rng(self.cfg.seed + seed_salt, self.cfg.device)
        try:
            out = self.guard("forward", module, x)
        finally:
            module.eval()
        if not isinstance(out, torch.Tensor):
            raise Violation(f"forward returned a {type(out).__module__}.{type(out).__qualname__}, expected a torch.Tensor")
        expected = self.kind.output_shape(self.cfg, num_tokens=x.shape[-2], batch=x.shape[0] if self.kind.batched else None)
        if tuple(out.shape) != expected:
            raise Violation(f"forward returned shape {tuple(out.shape)}, expected {expected} for input {tuple(x.shape)}")
        if out.is_floating_point() and not torch.isfinite(out).all() and torch.isfinite(x).all():
            index = tuple(int(i) for i in (~torch.isfinite(out)).nonzero()[0])
            raise Violation(f"forward returned output[{index}] = {out[index].item()} for a finite input "
                            f"(scale {self.cfg.scale:g}, {'train' if train else 'eval'} mode)")
        return out.clone()  # a module may reuse its output buffer; comparisons need their own copy

    def observe(self, x, train=False, module=None):
        """(output, Observation); NotApplicable if no attention softmax is seen."""
        probe = AttentionProbe(x.shape[-2])
        with probe:
            out = self.forward(x, train=train, module=module)
        if not probe.observation.heads:
            raise NotApplicable("attention weights are not observable (no softmax over a num_tokens x num_tokens "
                                "score matrix; fused scaled_dot_product_attention?)", structural=False)
        return out, probe.observation

    def projections(self, module=None):
        module = self.module if module is None else module
        parts = self.guard("the adapter's projections()", self.target.adapter.projections, module)
        if parts is None:
            raise NotApplicable("the projections are not found (no W_query/W_key/W_value; an adapter can name them)")
        return parts
