"""Run invariants against targets under a Hypothesis profile; the repro is added here, once.

Each (invariant, target) pair becomes one ``@given`` test (``hypothesis_test``); ``check_invariant``
runs it and turns the outcome into a Result. Before searching, the strategy's simplest configuration
is tried once: a structural n/a or a plain bug is settled in milliseconds, and that example is already
minimal.

Honest budgets: a configuration the target declines (``Unsupported``) or where the invariant cannot
observe what it needs on that example (a non-structural ``NotApplicable``) is *rejected*
(``hypothesis.reject``): it does not count toward ``max_examples``, so every pass rests on the full
budget of checked examples (or says how many it got). The verdict (``exit_status``) is a pure function
of the TargetReports: an n/a fails the gate unless the user accepted it (``Result.accepted``).
"""

import dataclasses
import hashlib
import json
import re
import shlex
import time
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, event, find, given, note, reject, seed as hypothesis_seed, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.control import should_note

from attnspec.case import Case, describe
from attnspec.errors import InternalError, NotApplicable, Unsupported, UsageError, Violation, internal_error
from attnspec import profiles
from attnspec.invariants import BY_ID, CATALOGUE
from attnspec.kinds import DEFAULT_DTYPES, Config
from attnspec.strategies import configs, fit_example, is_small, landmarks
from attnspec.targets import projection_layout


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
        both = [name for name in self.only if name in self.skip]
        if both:
            raise UsageError(f"--only and --skip both name {', '.join(both)}: that selection checks nothing")
        return [inv for inv in CATALOGUE if (not self.only or inv.id in self.only) and inv.id not in self.skip]

    def check_selection(self, kinds):
        """UsageError if the selection leaves nothing to check: an ``--only`` id that applies to none of
        ``kinds``, or a kind with no selected invariant."""
        selected = self.selected()
        for name in self.only:
            if not any(BY_ID[name].applies_to(kind) for kind in kinds):
                required = BY_ID[name].configs.get("require", ())
                why = (f"it requires the optional feature {', '.join(required)}, which the target's adapter does not "
                       f"declare" if any(k.name in BY_ID[name].kinds for k in kinds)
                       else f"it applies to {', '.join(BY_ID[name].kinds)}")
                raise UsageError(f"--only {name} does not apply to kind {', '.join(sorted({k.name for k in kinds}))} "
                                 f"({why}): nothing to check")
        for kind in kinds:
            if not any(inv.applies_to(kind) for inv in selected):
                raise UsageError(f"the selected invariants leave nothing to check on kind {kind.name}")


@dataclass
class Tally:
    """What happened across the examples of one invariant on one target."""

    checked: int = 0
    not_applicable: int = 0
    unsupported: int = 0
    na_reason: str = ""
    structural: bool = False  # a not-applicable that holds for every configuration
    unsupported_reason: str = ""
    rejected: int = 0  # examples the search rejected (unsupported or n/a for that example): not counted
    failure: tuple = None  # (cfg, message) of the latest failing example: after shrinking, the minimal one
    internal: tuple = None  # (cfg, message) of the first example where attnspec's own code raised
    layout: str = ""  # where the projections were found (targets.projection_layout), if looked up
    passed_first: object = None  # the explicit first configuration, once checked and passed
    printed: list = field(default_factory=list)


STATUSES = ("pass", "fail", "not-applicable", "internal-error")


@dataclass
class Result:
    invariant: str
    status: str  # one of STATUSES ("internal-error": attnspec's own code raised)
    examples: int = 0  # examples checked (the budget, unless the search ran out of supported ones)
    unsupported: int = 0  # drawn configurations the target declined (rejected, not counted)
    seconds: float = 0.0
    reason: str = ""  # why not applicable, or what failed
    counterexample: dict = None
    repro: str = ""
    printed: int = 0  # characters the module printed to stdout (captured, not shown)
    layout: str = ""  # where the projections were found, for invariants that observe them
    rejected: int = 0  # examples rejected by the search (unsupported, or n/a on that example only)
    budget: int = 0  # max_examples the search ran under (0: one given --example)
    accepted: str = ""  # an n/a the user accepted (--accept-na, expectations file): where and why


@dataclass(frozen=True)
class Declined:
    """A configuration the adapter's ``adjust`` failed on (raised, or returned no Config): that example is the
    target's failure (``error``: a Violation, or the Unsupported/NotApplicable the adapter raised)."""

    config: Config
    error: Exception


def adjusted(adapter, cfg):
    """``adapter.adjust(cfg)``, or Declined: the adapter is the target's code."""
    try:
        out = adapter.adjust(cfg)
    except NotApplicable as e:
        return Declined(cfg, NotApplicable(describe(e, with_type=False), structural=getattr(e, "structural", True)))
    except Unsupported as e:
        return Declined(cfg, Unsupported(describe(e, with_type=False)))
    except BaseException as e:
        return Declined(cfg, Violation(f"the adapter's adjust() raised {describe(e)}"))
    if not isinstance(out, Config):
        return Declined(cfg, Violation(f"the adapter's adjust() returned {type(out).__name__}, not a Config"))
    return out


def _drawn_configs(inv, kind, options):
    """The configurations ``inv`` draws for ``kind`` under ``options``, before any adapter's ``adjust``."""
    kwargs = dict(dtypes=options.dtypes, device=options.device, sizes=options.sizes)
    kwargs.update(inv.configs)
    if options.regimes:
        kwargs["regimes"] = options.regimes
    return configs(kind, **kwargs)


def strategy_for(inv, target, options):
    return _drawn_configs(inv, target.kind, options).map(lambda cfg: adjusted(target.adapter, cfg))


def repro_command(inv, target, cfg):
    variants = "".join(f" --variant {v}" for v in getattr(target, "variants", ()))
    return f"attnspec check {shlex.quote(target.spec)}{variants} --only {inv.id} --example {shlex.quote(cfg.to_json())}"


# Rejected examples, none checked, before an invariant is called n/a: a declined configuration costs
# microseconds (an adapter with 1 in 16 supported misses 200 in a row with probability 2.5e-6), one the
# invariant cannot observe costs a forward pass.
GIVE_UP = {"unsupported": 200, "not-applicable": 30}


class _GiveUp(BaseException):  # not an Exception: Hypothesis lets it through at once, no shrinking
    """Stop searching: the invariant is n/a on this target (structural, or nothing checkable drawn)."""


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
            smallest = adjusted(target.adapter, smallest)
            if isinstance(smallest, Declined):  # judged in the example that meets it
                return None
            case = Case(target, smallest, time_limit=time_limit)
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
    """Check one configuration: True if checked, False if unsupported or n/a (recorded in tally);
    raises Violation (recorded in tally) if the invariant is broken. An exception of attnspec's own code
    is recorded as ``tally.internal`` (never the module's fault); later examples are then skipped."""
    if tally.internal:
        return True
    declined = cfg if isinstance(cfg, Declined) else None
    cfg = declined.config if declined else cfg
    case = Case(target, cfg, time_limit=time_limit, stdout_sink=tally.printed)
    try:
        if declined:
            raise declined.error
        invalid = target.kind.invalid_reason(cfg)
        if invalid:  # an adapter's adjust() went too far
            raise Unsupported(f"adjusted configuration is invalid: {invalid}")
        unsupported = unsupported_dtype(target, cfg, time_limit)
        if unsupported:
            raise Unsupported(unsupported)
        inv.check(case)
        tally.checked += 1
        return True
    except NotApplicable as e:  # (raised by an adapter, their messages are its code: formatted with care)
        tally.not_applicable += 1
        tally.na_reason = describe(e, with_type=False)
        tally.structural = tally.structural or getattr(e, "structural", False)
    except Unsupported as e:
        tally.unsupported += 1
        tally.unsupported_reason = describe(e, with_type=False)
    except Violation as e:
        tally.failure = (cfg, describe(e, with_type=False))
        raise
    except Exception as e:  # a bug in attnspec itself: say so loudly, with where
        tally.internal = (cfg, str(e if isinstance(e, InternalError) else internal_error(e)))
    finally:
        if "module" in case.__dict__ and "params" in inv.observes and not tally.layout:
            tally.layout = projection_layout(target.adapter, case.module)
    return False


def hypothesis_test(inv, target, options=None, tally=None):
    """The @given test driving ``inv`` over configurations of ``target``'s kind."""
    options = options or Options()
    tally = Tally() if tally is None else tally

    @given(cfg=strategy_for(inv, target, options))
    def test(cfg):
        shown = cfg.config if isinstance(cfg, Declined) else cfg
        if cfg == tally.passed_first:  # Hypothesis starts from the simplest configuration, already checked
            return
        if should_note():  # (only for the failure Hypothesis reports: the command costs ~0.2 ms to format)
            note(f"reproduce: {repro_command(inv, target, shown)}")
        event(f"num_heads={shown.num_heads} num_tokens={'full' if shown.num_tokens == shown.context_length else 'short'}")
        if not run_example(inv, target, cfg, tally, options.time_limit):
            tally.rejected += 1
            if tally.checked == 0 and (tally.structural or tally.unsupported >= GIVE_UP["unsupported"]
                                       or tally.not_applicable >= GIVE_UP["not-applicable"]):
                raise _GiveUp()
            reject()  # not counted toward max_examples: draw another configuration

    # Hypothesis keys its example database by the test's source; ours is shared, so add the pair.
    test._hypothesis_internal_add_digest = f"{inv.id}|{target.spec}".encode(errors="surrogateescape")
    # the seed ignores a target file's directory: the same verdict from any checkout (CI clones elsewhere)
    pair = f"{inv.id}|{re.sub(r'[^=:]*/', '', target.spec)}".encode(errors="surrogateescape")
    overrides = {"max_examples": budget(options, inv)}
    base = settings.get_profile(profiles.resolve(options.profile)) if options.profile else settings.default
    if options.seed is None and base.derandomize:  # derandomized from the pair alone, not from this file's
        seed = int.from_bytes(hashlib.sha256(pair).digest()[:8], "little")  # source: a verdict survives a refactor
    else:
        seed = options.seed
    if seed is not None:
        test, overrides["derandomize"] = hypothesis_seed(seed)(test), False
    # rejected examples are expected (adapters decline configurations): not a health problem
    overrides["suppress_health_check"] = [*base.suppress_health_check, HealthCheck.filter_too_much]
    return settings(base, **overrides)(test)


def _loaded_profile():
    """The name of the loaded Hypothesis profile (``settings.get_current_profile_name``, Hypothesis >= 6.139)."""
    current = getattr(settings, "get_current_profile_name", None)
    return current() if current else getattr(settings, "_current_profile", None)


def budget(options, inv=None):
    """max_examples of ``inv``'s search under ``options``: --max-examples, else the profile's, or under the
    profiles of ``profiles.PER_INVARIANT_BUDGETS`` (ci) the invariant's own budget there (at most the profile's).
    The profile is ``options.profile``, else the one loaded (the repository's tests, a user's script): under
    attnspec's profiles, the budget `attnspec check` gives."""
    if options.max_examples is not None:
        return options.max_examples
    name = profiles.resolve(options.profile) if options.profile else _loaded_profile()
    examples = (settings.get_profile(name) if options.profile else settings.default).max_examples
    if inv is not None and name in profiles.PER_INVARIANT_BUDGETS:
        table, default = profiles.PER_INVARIANT_BUDGETS[name]
        return min(examples, table.get(inv.id, default))
    return examples


_SIMPLEST = {}  # repr of an unadjusted strategy -> its simplest configuration


def simplest_config(inv, target, options):
    """The strategy's simplest configuration (Hypothesis tries the all-zero choice sequence first),
    adjusted by the target's adapter. The unadjusted one is found once per kind and strategy arguments
    (``prepare_simplest`` finds them before workers fork)."""
    return adjusted(target.adapter, _unadjusted_simplest(_drawn_configs(inv, target.kind, options)))


def _unadjusted_simplest(strategy):
    key = repr(strategy)
    if key not in _SIMPLEST:
        _SIMPLEST[key] = find(strategy, lambda cfg: True,
                              settings=settings(database=None, max_examples=1, phases=[Phase.generate]))
    return _SIMPLEST[key]


def prepare_simplest(kind, options):
    """Find the simplest configuration of every selected invariant of ``kind`` (a few ms each), so that
    processes forked afterwards have them."""
    for inv in options.selected():
        if inv.applies_to(kind):
            _unadjusted_simplest(_drawn_configs(inv, kind, options))


def check_invariant(inv, target, options, example=None):
    """One Result for ``inv`` on ``target``: pass (with how many examples were checked), fail (with the
    minimal counterexample), or n/a (with the reason)."""
    start, tally = time.perf_counter(), Tally()

    def result(status, **kw):
        return Result(inv.id, status, examples=tally.checked, unsupported=tally.unsupported, rejected=tally.rejected,
                      layout=tally.layout,
                      budget=0 if example is not None else budget(options, inv),
                      seconds=round(time.perf_counter() - start, 3), printed=sum(map(len, tally.printed)), **kw)

    def internal():
        cfg, message = tally.internal
        return result("internal-error", reason=message, counterexample=json.loads(cfg.to_json()),
                      repro=repro_command(inv, target, cfg))

    def failed():
        cfg, message = tally.failure
        return result("fail", reason=message, counterexample=json.loads(cfg.to_json()),
                      repro=repro_command(inv, target, cfg))

    def not_applicable():
        reason = tally.na_reason or f"every drawn configuration is unsupported: {tally.unsupported_reason}"
        return result("not-applicable", reason=reason)

    if not inv.applies_to(target.kind):
        return result("not-applicable", reason=f"does not apply to kind {target.kind.name}")
    adapted = ""
    if example is not None:  # moved onto what the invariant needs (e.g. dropout > 0) and the adapter supports, and said so
        example, changes = fit_example(example, target.kind, **inv.configs)
        moved = adjusted(target.adapter, example)
        if not isinstance(moved, Declined):
            changes += [f"{k} {getattr(example, k)!r} -> {getattr(moved, k)!r} (the adapter's adjust)"
                        for k in sorted(example.__dataclass_fields__) if getattr(example, k) != getattr(moved, k)]
        example = moved
        adapted = f"--example adapted for this invariant: {', '.join(changes)}" if changes else ""
    first = example or simplest_config(inv, target, options)
    try:
        if run_example(inv, target, first, tally, options.time_limit):
            tally.passed_first = first
        else:
            tally.rejected += 1  # the search below draws supported configurations instead
    except Violation:
        if adapted:
            tally.failure = (tally.failure[0], f"{tally.failure[1]} [{adapted}]")
        return failed()
    if tally.internal:
        return internal()
    if tally.structural or (example is not None and not tally.checked):
        return not_applicable()
    if example is not None:
        return result("pass", reason=adapted)
    try:
        hypothesis_test(inv, target, options, tally)()
    except Violation:
        if not options.sizes and not is_small(tally.failure[0]):  # shrinking does not cross size regimes:
            small = Tally()  # look for the failure among small sizes too, and report it there if it shows
            try:
                hypothesis_test(inv, target, dataclasses.replace(options, regimes=("small",)), small)()
            except Violation:
                tally.failure = small.failure
            except (Exception, _GiveUp):  # e.g. Flaky, or nothing checkable at small sizes: keep the large one
                pass
        return failed()
    except (_GiveUp, Unsatisfiable):  # nothing checkable was drawn
        if tally.checked == 0:
            return not_applicable()
    except Exception as e:  # Hypothesis's own verdicts, e.g. a failure that did not replay (Flaky)
        if tally.failure is None:
            raise
        cfg, message = tally.failure
        tally.failure = (cfg, f"{message} [{type(e).__name__}: the failure did not reproduce on replay: "
                              f"the module is nondeterministic]")
        return failed()
    if inv.landmarks and not options.sizes and not options.regimes:  # real sizes, after the readable search
        extreme = inv.configs.get("extreme_dtype")
        for cfg in landmarks(target.kind, _unadjusted_simplest(_drawn_configs(inv, target.kind, options)),
                             dtype=extreme if extreme in options.dtypes else None):
            try:
                run_example(inv, target, adjusted(target.adapter, cfg), tally, options.time_limit)
            except Violation:
                cfg, message = tally.failure
                tally.failure = (cfg, f"{message} [at a landmark size (strategies.LANDMARKS), checked after a search "
                                      f"that passed: not shrunk]")
                return failed()
    if tally.internal:
        return internal()
    if tally.checked == 0:
        return not_applicable()
    skipped = [f"{tally.unsupported} unsupported ({tally.unsupported_reason})" if tally.unsupported else "",
               f"{tally.not_applicable} not observable ({tally.na_reason})" if tally.not_applicable else ""]
    return result("pass", reason="; ".join(filter(None, skipped)) and f"rejected: {'; '.join(filter(None, skipped))}")


@dataclass
class TargetReport:
    target: object
    results: list

    @property
    def failed(self):
        return any(r.status == "fail" for r in self.results)

    @property
    def internal_error(self):
        """attnspec's own code raised while checking this target (a bug of attnspec, not the module's)."""
        return any(r.status == "internal-error" for r in self.results)

    @property
    def layout(self):
        """Where the projections were found (the first invariant that looked them up says)."""
        return next((r.layout for r in self.results if r.layout), "")

    @property
    def printed(self):
        return sum(r.printed for r in self.results)

    @property
    def status(self):
        """This target's exit status (see ``exit_status``)."""
        return exit_status([self])


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


# Exit statuses of `attnspec check` (and the verdict of a pytest run), by precedence: a usage error (2)
# is raised before anything runs; then a violation (1), an internal error of attnspec (4), an n/a the
# user did not accept (3: not fully checked), and 0: every applicable invariant checked and holds.
EXIT = {0: "checked: every applicable invariant holds", 1: "FAIL: an invariant is violated",
        2: "usage error", 3: "NOT FULLY CHECKED: an invariant is n/a and not accepted",
        4: "INTERNAL ERROR in attnspec (not the module's fault)"}
PRECEDENCE = (2, 1, 4, 3, 0)


def result_status(result):
    """The exit status one Result calls for."""
    if result.status == "fail":
        return 1
    if result.status == "internal-error":
        return 4
    if result.status == "not-applicable" and not result.accepted:
        return 3
    return 0


def exit_status(reports, usage_error=False):
    """The exit status of a run: the most severe of its results by PRECEDENCE (2, 1, 4, 3, 0). A run with
    nothing checked at all is not fully checked (3), never 0."""
    found = {result_status(r) for rep in reports for r in rep.results}
    if usage_error:
        found.add(2)
    if not any(r.status == "pass" for rep in reports for r in rep.results):
        found.add(3)
    return next(code for code in PRECEDENCE if code in found or code == 0)


# One example of each of these, on the bundled mha, touches what torch and Hypothesis initialize on first
# use: forward, the probe, backward, dropout, Hypothesis's engine.
WARM_UP = ("output-contract", "weights-rows-sum-to-one", "gradient-oracle", "dropout-on-weights")


def warm_up():
    """Check one example of ``WARM_UP`` on the bundled mha, single-threaded, so that the state torch and
    Hypothesis build on first use exists before worker processes fork: Hypothesis's scan of the loaded
    modules for constants and its PRNG registration (a full ``gc.collect``), torch's first kernel calls
    and autograd. Every forked worker then starts warm (~0.4 CPU s less each; ~0.2 s once here). Torch's
    thread count is restored and no thread pool is started (a child forked after one has a broken pool).
    The result is not a verdict on anything and is discarded; so is an exception (a fault it meets shows
    again, reported, in the worker that meets it)."""
    import torch

    from attnspec.targets import resolve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_target(resolve("mha=attnspec.impl:MultiHeadAttention"),
                     Options(profile="attnspec-ci", max_examples=1, only=WARM_UP))
    except Exception:
        pass
    finally:
        torch.set_num_threads(threads)
