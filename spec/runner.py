"""Run invariants against targets under a Hypothesis profile; the repro is added here, once.

Each (invariant, target) pair becomes one ``@given`` test (``hypothesis_test``): pytest runs it
directly, ``check_target`` runs it and turns the outcome into a Result. Before searching, the
strategy's simplest configuration is tried once: a structural n/a or a plain bug is settled in
milliseconds, and that example is already minimal."""

import dataclasses
import json
import shlex
import time
import traceback
from dataclasses import dataclass, field

from hypothesis import Phase, event, find, given, note, seed as hypothesis_seed, settings

from attnspec.case import Case
from attnspec.errors import NotApplicable, Unsupported, UsageError, Violation
from attnspec.invariants import BY_ID, CATALOGUE
from attnspec.kinds import DEFAULT_DTYPES, Config
from attnspec.strategies import configs, fit_example, is_small


@dataclass
class Options:
    """What to draw and how hard to look. ``dtypes``/``device``/``sizes`` feed the strategies."""

    profile: str = None  # a Hypothesis profile name; None: the loaded default
    max_examples: int = None  # None: the profile's
    seed: int = None  # None: the profile's (derandomized in ci)
    dtypes: tuple = DEFAULT_DTYPES
    device: str = "cpu"
    sizes: dict = None
    time_limit: float = None  # per constructor/forward call, seconds
    regimes: tuple = None  # size regimes to draw (spec.strategies.REGIMES); None: the invariant's
    only: tuple = ()
    skip: tuple = ()

    def selected(self):
        for name in (*self.only, *self.skip):
            if name not in BY_ID:
                raise UsageError(f"unknown invariant id {name!r}: run `attnspec list` for the ids")
        return [inv for inv in CATALOGUE if (not self.only or inv.id in self.only) and inv.id not in self.skip]


@dataclass
class Tally:
    """What happened across the examples of one invariant on one target."""

    checked: int = 0
    not_applicable: int = 0
    unsupported: int = 0
    na_reason: str = ""
    structural: bool = False  # a not-applicable that holds for every configuration
    unsupported_reason: str = ""
    failure: tuple = None  # (cfg, message) of the latest failing example: after shrinking, the minimal one
    printed: list = field(default_factory=list)


@dataclass
class Result:
    invariant: str
    status: str  # "pass", "fail" or "not-applicable"
    examples: int = 0
    unsupported: int = 0
    seconds: float = 0.0
    reason: str = ""  # why not applicable, or what failed
    counterexample: dict = None
    repro: str = ""
    printed: int = 0  # characters the module printed to stdout (captured, not shown)


def strategy_for(inv, target, options):
    kwargs = dict(dtypes=options.dtypes, device=options.device, sizes=options.sizes)
    kwargs.update(inv.configs)
    if options.regimes:
        kwargs["regimes"] = options.regimes
    return configs(target.kind, **kwargs).map(target.adapter.adjust)


def repro_command(inv, target, cfg):
    return f"attnspec check {shlex.quote(target.spec)} --only {inv.id} --example {shlex.quote(cfg.to_json())}"


LOW_PRECISION = ("float16", "bfloat16")


def unsupported_dtype(target, cfg, time_limit=None):
    """Why ``target`` does not support cfg's float16/bfloat16, or None. Supporting a low-precision dtype
    means: the smallest configuration builds and runs forward in it without raising. A module that
    raises there, and not in float32, has its examples in that dtype counted unsupported (e.g.
    masked_fill(-1e9) on float16 scores raises); one that runs is judged like any other: wrong values,
    NaN, or an exception at other sizes are violations. Decided once per target and dtype."""
    if cfg.dtype not in LOW_PRECISION:
        return None
    cache = target.__dict__.setdefault("_dtype_support", {})
    if (cfg.dtype, cfg.device) not in cache:
        def raised(dtype):
            smallest = Config(d_in=1, d_out=1, num_heads=1, context_length=1, num_tokens=1, batch=1, dropout=0.0,
                              qkv_bias=False, dtype=dtype, scale=1.0, seed=0, device=cfg.device)
            case = Case(target, target.adapter.adjust(smallest), time_limit=time_limit)
            try:
                case.forward(case.input())
            except Violation as e:
                return str(e) if " raised " in str(e) else None
            except (NotApplicable, Unsupported):
                return None
            return None

        low = raised(cfg.dtype)
        cache[cfg.dtype, cfg.device] = low and not raised("float32") and f"{cfg.dtype} is not supported: {low}"
    return cache[cfg.dtype, cfg.device] or None


def run_example(inv, target, cfg, tally, time_limit=None):
    """Check one configuration; raises Violation (recorded in tally) if the invariant is broken."""
    case = Case(target, cfg, time_limit=time_limit, stdout_sink=tally.printed)
    try:
        invalid = target.kind.invalid_reason(cfg)
        if invalid:  # an adapter's adjust() went too far
            raise Unsupported(f"adjusted configuration is invalid: {invalid}")
        unsupported = unsupported_dtype(target, cfg, time_limit)
        if unsupported:
            raise Unsupported(unsupported)
        inv.check(case)
        tally.checked += 1
    except NotApplicable as e:
        tally.not_applicable += 1
        tally.na_reason = str(e)
        tally.structural = tally.structural or e.structural
    except Unsupported as e:
        tally.unsupported += 1
        tally.unsupported_reason = str(e)
    except Violation as e:
        tally.failure = (cfg, str(e))
        raise
    except Exception as e:  # a bug in attnspec itself: say so loudly, with where
        where = traceback.extract_tb(e.__traceback__)[-1]
        tally.failure = (cfg, f"internal error in attnspec ({where.filename}:{where.lineno}): {type(e).__name__}: {e}")
        raise Violation(tally.failure[1]) from e


def hypothesis_test(inv, target, options=None, tally=None):
    """The @given test driving ``inv`` over configurations of ``target``'s kind."""
    options = options or Options()
    tally = Tally() if tally is None else tally

    @given(cfg=strategy_for(inv, target, options))
    def test(cfg):
        note(f"reproduce: {repro_command(inv, target, cfg)}")
        event(f"num_heads={cfg.num_heads} num_tokens={'full' if cfg.num_tokens == cfg.context_length else 'short'}")
        run_example(inv, target, cfg, tally, options.time_limit)

    # Hypothesis keys its example database by the test's source; ours is shared, so add the pair.
    test._hypothesis_internal_add_digest = f"{inv.id}|{target.spec}".encode()
    overrides = {} if options.max_examples is None else {"max_examples": options.max_examples}
    if options.seed is not None:
        test, overrides["derandomize"] = hypothesis_seed(options.seed)(test), False
    base = settings.get_profile(options.profile) if options.profile else settings.default
    return settings(base, **overrides)(test)


def simplest_config(inv, target, options):
    """The strategy's simplest configuration (Hypothesis tries the all-zero choice sequence first)."""
    return find(strategy_for(inv, target, options), lambda cfg: True,
                settings=settings(database=None, max_examples=1, phases=[Phase.generate]))


def check_invariant(inv, target, options, example=None):
    """One Result for ``inv`` on ``target``: pass, fail (with the minimal counterexample), or n/a."""
    start, tally = time.perf_counter(), Tally()

    def result(status, **kw):
        return Result(inv.id, status, examples=tally.checked, unsupported=tally.unsupported,
                      seconds=round(time.perf_counter() - start, 3), printed=sum(map(len, tally.printed)), **kw)

    def failed():
        cfg, message = tally.failure
        return result("fail", reason=message, counterexample=json.loads(cfg.to_json()),
                      repro=repro_command(inv, target, cfg))

    if not inv.applies_to(target.kind):
        return result("not-applicable", reason=f"does not apply to kind {target.kind.name}")
    adapted = ""
    if example is not None:  # moved onto what the invariant needs (e.g. dropout > 0), and said so
        example, changes = fit_example(example, target.kind, **inv.configs)
        adapted = f"--example adapted for this invariant: {', '.join(changes)}" if changes else ""
    first = example or simplest_config(inv, target, options)
    try:
        run_example(inv, target, first, tally, options.time_limit)
    except Violation:
        if adapted:
            tally.failure = (tally.failure[0], f"{tally.failure[1]} [{adapted}]")
        return failed()
    if tally.structural or example is not None:
        status = "not-applicable" if tally.not_applicable else "pass"
        return result(status, reason="; ".join(r for r in (tally.na_reason or tally.unsupported_reason, adapted) if r))
    try:
        hypothesis_test(inv, target, options, tally)()
    except Violation:
        if not options.sizes and not is_small(tally.failure[0]):  # shrinking does not cross size regimes:
            small = Tally()  # look for the failure among small sizes too, and report it there if it shows
            try:
                hypothesis_test(inv, target, dataclasses.replace(options, regimes=("small",)), small)()
            except Violation:
                tally.failure = small.failure
            except Exception:  # e.g. Flaky: keep the large counterexample
                pass
        return failed()
    except Exception as e:  # Hypothesis's own verdicts, e.g. a failure that did not replay (Flaky)
        if tally.failure is None:
            raise
        cfg, message = tally.failure
        tally.failure = (cfg, f"{message} [{type(e).__name__}: the failure did not reproduce on replay: "
                              f"the module is nondeterministic]")
        return failed()
    if tally.checked == 0:
        return result("not-applicable", reason=tally.na_reason or f"every configuration unsupported: {tally.unsupported_reason}")
    return result("pass", reason=f"unsupported: {tally.unsupported_reason}" if tally.unsupported else "")


@dataclass
class TargetReport:
    target: object
    results: list

    @property
    def failed(self):
        return any(r.status == "fail" for r in self.results)

    @property
    def printed(self):
        return sum(r.printed for r in self.results)


def check_target(target, options, progress=None, example=None):
    """Every selected invariant that applies to the target's kind; ``progress(result)`` after each."""
    results = []
    contract_broken = None
    for inv in (inv for inv in options.selected() if inv.applies_to(target.kind)):
        if contract_broken:
            results.append(Result(inv.id, "not-applicable", reason=f"not checked: {contract_broken}"))
        else:
            results.append(check_invariant(inv, target, options, example))
            if inv.id == "output-contract" and results[-1].status == "fail":
                contract_broken = "output-contract fails; fix it first"
        if progress:
            progress(results[-1])
    return TargetReport(target, results)
