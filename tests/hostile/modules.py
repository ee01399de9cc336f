"""Hostile modules (issue 12): each class does one thing a module under test must not be able to do
to the gate: end or kill its process, defeat the timer, fool a comparison, poison the next target,
crash the harness or get attnspec blamed. tests/test_hostile.py checks each through `attnspec check`.
Every class is otherwise the seed's MultiHeadAttention (correct), so the only fault is the hostile one."""

import atexit
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
import warnings

import torch

from attnspec.impl import MultiHeadAttention


def _forever():
    while True:
        time.sleep(0.01)


# -- failing runs that exited 0

class Exit0Forward(MultiHeadAttention):
    def forward(self, x):
        os._exit(0)


class Exit0Thread(MultiHeadAttention):
    def forward(self, x):
        thread = threading.Thread(target=os._exit, args=(0,))
        thread.start()
        thread.join()
        return super().forward(x)


class AtexitExit0(MultiHeadAttention):
    """Wrong output shape, and an atexit hook that exits 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        atexit.register(os._exit, 0)

    def forward(self, x):
        return super().forward(x)[:, :-1]  # one token short


class _ZeroDifference(torch.Tensor):
    """A tensor whose differences (and comparisons) all say "equal"."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if getattr(func, "__name__", "") in ("__sub__", "sub", "__rsub__", "isclose", "allclose", "equal"):
            return torch.zeros_like(out.as_subclass(torch.Tensor)) if isinstance(out, torch.Tensor) else True
        return out


class FakeSubNotCausal(MultiHeadAttention):
    """Attends to the future (the mean over every token), behind a tensor subclass whose `-` is zero."""

    def forward(self, x):
        mixed = x.mean(dim=1, keepdim=True).expand_as(x)
        return self.out_proj(self.W_value(mixed)).as_subclass(_ZeroDifference)


# -- ending or killing its own process

class KillSelf(MultiHeadAttention):
    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)


class TermSelf(MultiHeadAttention):
    def forward(self, x):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


class Segfault(MultiHeadAttention):
    def forward(self, x):
        ctypes.string_at(0)


# -- defeating the timer (run with --time-limit 1)

class IgnoresAlarm(MultiHeadAttention):
    def forward(self, x):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        _forever()


class BlocksAlarm(MultiHeadAttention):
    def forward(self, x):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        _forever()


class CancelsAlarm(MultiHeadAttention):
    def forward(self, x):
        signal.alarm(0)
        _forever()


class SwallowsTimeout(MultiHeadAttention):
    def forward(self, x):
        while True:
            try:
                _forever()
            except:  # noqa: E722 (the point: a bare except swallows the timer's exception)
                pass


class LongNativeCall(MultiHeadAttention):
    """One C++ op of minutes (~20 products of 4000 x 4000 matrices): no Python signal handler runs
    until it returns."""

    def forward(self, x):
        return torch.linalg.matrix_power(torch.eye(4000) * 0.5, 1000)


class NonDaemonThread(MultiHeadAttention):
    """Correct, but leaves a non-daemon thread running forever."""

    def forward(self, x):
        threading.Thread(target=_forever).start()
        return super().forward(x)


class _HangingMessage(Exception):
    def __str__(self):
        _forever()


class _RaisingMessage(Exception):
    def __str__(self):
        raise RuntimeError("no message for you")

    __repr__ = __str__


class MessageHangs(MultiHeadAttention):
    def forward(self, x):
        raise _HangingMessage()


class MessageRaises(MultiHeadAttention):
    def forward(self, x):
        raise _RaisingMessage()


# -- BaseExceptions and text the harness used to crash on

class RaisesKeyboardInterrupt(MultiHeadAttention):
    def forward(self, x):
        raise KeyboardInterrupt


class RaisesGeneratorExit(MultiHeadAttention):
    def forward(self, x):
        raise GeneratorExit


class LoneSurrogate(MultiHeadAttention):
    def forward(self, x):
        raise ValueError("bad byte \udc80 in the message")


class DeletesCwd(MultiHeadAttention):
    """Correct, but leaves the process in a working directory it deleted."""

    def forward(self, x):
        path = tempfile.mkdtemp()
        os.chdir(path)
        os.rmdir(path)
        return super().forward(x)


# -- faults that were blamed on attnspec

class MetaOutput(MultiHeadAttention):
    def forward(self, x):
        return torch.empty(super().forward(x).shape, device="meta")


class TrainRaises(MultiHeadAttention):
    def train(self, mode=True):
        if mode:
            raise RuntimeError("this module cannot train")
        return super().train(mode)


class ToReturnsNone(MultiHeadAttention):
    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)


# -- correct modules that change process-wide state after computing their output

def _poison(change):
    class Poisoned(MultiHeadAttention):
        def forward(self, x):
            out = super().forward(x)
            change()
            return out

    Poisoned.__name__ = Poisoned.__qualname__ = change.__name__
    return Poisoned


def GradOff():
    torch.set_grad_enabled(False)


def MetaDefaultDevice():
    torch.set_default_device("meta")


def Float16DefaultDtype():
    torch.set_default_dtype(torch.float16)


def Chdir():
    os.chdir(tempfile.gettempdir())


def ReplacesStdout():
    sys.stdout = sys.stderr = open(os.devnull, "w")


def WarningsAsErrors():
    warnings.simplefilter("error")


def SeedsRng():
    torch.manual_seed(0)


def Threads():
    torch.set_num_threads(3)


def BlocksAlarmAfter():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})


def IgnoresSignals():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def PushesFunctionMode():
    torch.overrides.TorchFunctionMode().__enter__()


def PushesDispatchMode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    FakeTensorMode().__enter__()  # every later op would make fake tensors
    TorchDispatchMode().__enter__()


def RecursionLimit():
    for limit in range(10, 100000, 5):  # the lowest limit allowed at this depth: attnspec's next calls would hit it
        try:
            return sys.setrecursionlimit(limit)
        except RecursionError:
            pass


POISONS = [GradOff, MetaDefaultDevice, Float16DefaultDtype, Chdir, ReplacesStdout, WarningsAsErrors, SeedsRng, Threads,
           BlocksAlarmAfter, IgnoresSignals, PushesFunctionMode, PushesDispatchMode, RecursionLimit]
for _change in POISONS:
    globals()[_change.__name__] = _poison(_change)


# -- more ways out of a comparison or a process (red-team pass 3)

class _ZeroSubtraction(__import__("torch.utils._python_dispatch", fromlist=["x"]).TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        subtractions = (torch.ops.aten.sub.Tensor, torch.ops.aten.rsub.Scalar, torch.ops.aten.sub.Scalar)
        return torch.zeros_like(out) if func in subtractions else out


class DispatchModeNotCausal(MultiHeadAttention):
    """Not causal (its mask zeroed), and leaves a dispatch mode entered that makes every difference 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask.zero_()

    def forward(self, x):
        out = super().forward(x)
        _ZeroSubtraction().__enter__()
        return out


class ReturnsNested(MultiHeadAttention):
    def forward(self, x):
        return torch.nested.nested_tensor(list(super().forward(x).unbind(0)))


class ForksThenExits(MultiHeadAttention):
    """A child that outlives it (holding the worker's pipes), then os._exit(0); the child's pid is written to
    $ATTNSPEC_TEST_PIDFILE."""

    def forward(self, x):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        with open(os.environ.get("ATTNSPEC_TEST_PIDFILE", os.devnull), "a") as f:
            f.write(f"{pid}\n")
        os._exit(0)


class UsesWorkerProcesses(MultiHeadAttention):
    """Correct: its forward runs through a DataLoader with a worker process (a worker may have children)."""

    def forward(self, x):
        from torch.utils.data import DataLoader

        (batch,) = list(DataLoader([x], batch_size=None, num_workers=1))
        return super().forward(batch)


class SignalsSupervisor(MultiHeadAttention):
    """Sends $ATTNSPEC_TEST_SIGNAL (default SIGUSR1) to its supervisor."""

    def forward(self, x):
        os.kill(os.getppid(), getattr(signal, os.environ.get("ATTNSPEC_TEST_SIGNAL", "SIGUSR1")))
        time.sleep(0.5)
        return super().forward(x)


class _TwoFaced(torch.Tensor):
    """Copies see the right values, arithmetic sees NaN: a wrapper subclass whose __torch_dispatch__ lies."""

    @staticmethod
    def __new__(cls, good):
        t = torch.Tensor._make_wrapper_subclass(cls, good.shape, dtype=good.dtype, device=good.device)
        t.good = good
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        copy = func.__name__.split(".")[0] in ("clone", "_to_copy", "copy_", "detach", "alias", "view")
        unwrap = lambda a: (a.good if copy else a.good * float("nan")) if isinstance(a, _TwoFaced) else a  # noqa: E731
        return func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})


class ReturnsTwoFacedSubclass(MultiHeadAttention):
    def forward(self, x):
        return _TwoFaced(super().forward(x).detach())


class RaisesUnsupported(MultiHeadAttention):
    """Declines the inputs it fails on by raising attnspec's Unsupported from forward (only an adapter's build() may)."""

    def forward(self, x):
        from attnspec.errors import Unsupported

        raise Unsupported("not this input")


class SpawnsSleeper(MultiHeadAttention):
    """Correct, but its constructor starts a long `sleep` (its pid written to $ATTNSPEC_TEST_PIDFILE)."""

    def __init__(self, *args, **kwargs):
        import subprocess

        super().__init__(*args, **kwargs)
        sleeper = subprocess.Popen(["sleep", "300"])
        with open(os.environ.get("ATTNSPEC_TEST_PIDFILE", os.devnull), "a") as f:
            f.write(f"{sleeper.pid}\n")


# -- found by the hostile pass of the eighth session

class DeclinesInConstructor(MultiHeadAttention):
    """Declines every configuration of more than one head by raising attnspec's Unsupported from its constructor:
    the rest of the catalogue would check one-head modules only (only an adapter's build() may decline)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        if num_heads > 1:
            from attnspec.errors import Unsupported

            raise Unsupported("one head only")
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)


class RaisesNotApplicable(MultiHeadAttention):
    """Declines the inputs it fails on by raising attnspec's NotApplicable from forward."""

    def forward(self, x):
        from attnspec.errors import NotApplicable

        raise NotApplicable("not this input")


class ResizesInput(MultiHeadAttention):
    """Correct output, then the input resized to nothing in place: attnspec's own code then read x's shape."""

    def forward(self, x):
        out = super().forward(x)
        x.resize_(0)
        return out


class _GQA:
    from attnspec.impl import GroupedQueryAttention as base


class ClearsPaddingMask(_GQA.base):
    """Fills the caller's padding mask with True in place, then attends every key: the padding check compared the
    outputs at the tokens its (now all-True) mask called real."""

    def forward(self, x, use_cache=False, attention_mask=None):
        if attention_mask is not None:
            attention_mask.fill_(True)
        return super().forward(x, use_cache=use_cache)


class ReportBecomesFifo(MultiHeadAttention):
    """Correct; at construction, replaces the file $ATTNSPEC_TEST_REPORT with a FIFO: opening it to write the report
    would block the supervisor for ever."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = os.environ.get("ATTNSPEC_TEST_REPORT")
        if path and not os.path.exists(path + ".done"):
            open(path + ".done", "w").close()
            if os.path.exists(path):
                os.remove(path)
            os.mkfifo(path)
