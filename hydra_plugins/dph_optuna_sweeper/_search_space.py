"""The search space of a sweep: Hydra override grammar -> Optuna distributions, define-by-run.

    choice(a, b, c) or a,b,c     -> categorical
    range(1, 9, 2)               -> integers 1, 3, 5, 7 (stop excluded; float steps give a float grid)
    interval(0.0, 1.0)           -> uniform float
    int(interval(1, 64))         -> uniform integer (both ends included)
    tag(log, interval(1e-4, 1))  -> log-uniform (also with int(...))
    0.5, [1, 2], 'text'          -> a fixed value passed to every trial

Conditions ``{child: {parent: [values]}}`` make a parameter exist only when its parents took one of
the listed values in the same trial; parents are sampled first (a topological order that otherwise
keeps the declared order). Imported only when a sweep starts (Hydra's plugin scan skips modules
whose names start with ``_``).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer

from ._errors import SweepConfigError


class SearchSpaceError(SweepConfigError):
    """An impossible hydra.sweeper.params / conditional entry; the message names it and the fix."""


@dataclass
class Param:
    """One entry of the search space: sampled (``distribution``) or fixed (``fixed_override``)."""

    name: str                          # the config key or group, e.g. divergence.weight
    key: str                           # as written before '=', with any +/++ prefix
    distribution: Any = None           # an optuna distribution; None for a fixed value
    choice_texts: list[str] = field(default_factory=list)   # categorical: the override text of each choice
    grid: list[Any] | None = None      # the finite values (choice, range), for the grid sampler
    fixed_value: Any = None            # fixed: the parsed value (for conditions on it)
    fixed_override: str = ""           # fixed: the whole override, e.g. "trainer.steps=10"
    conditions: dict[str, list[Any]] = field(default_factory=dict)   # parent -> allowed values

    @property
    def sampled(self) -> bool:
        return self.distribution is not None

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether every parent is present in ``values`` with one of its allowed values."""
        return all(parent in values and _matches(values[parent], allowed)
                   for parent, allowed in self.conditions.items())

    def override(self, value: Any) -> str:
        """The override that gives this parameter ``value`` in a job."""
        if not self.sampled:
            return self.fixed_override
        from optuna.distributions import CategoricalDistribution

        if isinstance(self.distribution, CategoricalDistribution):
            return f"{self.key}={self.choice_texts[self.distribution.to_internal_repr(value)]}"
        return f"{self.key}={format_number(value)}"


def _matches(value: Any, allowed: Sequence[Any]) -> bool:
    return any(value == x or str(value) == str(x) for x in allowed)


def format_number(value: Any) -> str:
    """A sampled int/float in override syntax (floats keep full precision: repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def param_text(value: Any) -> str:
    """A value of ``hydra.sweeper.params`` as the right-hand side of an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_QUOTE_RUNS = re.compile(r"(\\*)'")
_TRAILING_BACKSLASHES = re.compile(r"(\\+)$")


def quote(text: str) -> str:
    """``text`` as a single-quoted string of Hydra's override grammar (where backslashes are special
    only before a quote, or before the closing quote)."""
    text = _QUOTE_RUNS.sub(lambda m: m.group(1) * 2 + "\\'", text)
    text = _TRAILING_BACKSLASHES.sub(lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _value_text(value: Any) -> str:
    """A parsed element back in override syntax, such that Hydra parses it to the same value."""
    text = Transformer.str(value)
    if isinstance(value, str):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            same = OverridesParser.create().parse_override(f"k={text}").value() == value
        except Exception:  # noqa: BLE001 - any parse error: quote it
            same = False
        if not same:
            text = quote(value)  # e.g. the string 'true', which unquoted would be a bool
    elif isinstance(value, bool):
        text = "true" if value else "false"
    return text


def _from_sweep(override: Override) -> tuple[Any, list[str], list[Any] | None]:
    """(distribution, choice texts, grid values) of a sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    where = f"hydra.sweeper.params: {override.input_line}"
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        raw = list(override.sweep_iterator())  # once: a shuffled range reshuffles on every call
        texts = [_value_text(x) for x in raw]
        choices = [x if isinstance(x, (str, int, float, bool)) else text for x, text in zip(raw, texts)]
        if not choices:
            raise SearchSpaceError(f"{where} has no values")
        if len({repr(c) for c in choices}) != len(choices):
            raise SearchSpaceError(f"{where} lists a value twice: give each value once")
        return CategoricalDistribution(choices), texts, choices
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{where} is empty (range stop is excluded): widen it")
        if "log" in value.tags:
            raise SearchSpaceError(f"{where}: log is not supported with range(); use tag(log, interval(a, b))")
        low, high, step = min(values), max(values), abs(value.step)  # a negative step counts down
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return IntDistribution(low, high, step=step), [], values
        return FloatDistribution(float(low), float(high), step=float(step)), [], values
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log = "log" in value.tags
        if value.start >= value.end:
            raise SearchSpaceError(f"{where}: the interval is empty; write interval(low, high) with low < high")
        if log and value.start <= 0:
            raise SearchSpaceError(f"{where}: a log interval needs a positive lower end")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log), [], None
        return FloatDistribution(float(value.start), float(value.end), log=log), [], None
    raise SearchSpaceError(f"{where} is not a sweep the optuna sweeper knows: use choice, range or interval")


def _param(override: Override) -> Param:
    key = override.get_key_element()
    name = override.key_or_group if override.package is None else f"{override.package}:{override.key_or_group}"
    if override.is_sweep_override():
        distribution, texts, grid = _from_sweep(override)
        return Param(name, key, distribution, texts, grid)
    if override.is_delete():
        return Param(name, key, fixed_value=None, fixed_override=key)
    text = override.get_value_element_as_str()
    return Param(name, key, fixed_value=override.value(), fixed_override=f"{key}={text}")


class SearchSpace:
    """The ordered parameters of a sweep; ``suggest`` samples one trial, ``overrides`` launches it."""

    def __init__(self, params: Sequence[Param]):
        self.params = list(params)

    @classmethod
    def from_overrides(cls, overrides: Sequence[Override], conditional: Mapping[str, Any] | None = None) -> "SearchSpace":
        """Parameters from parsed overrides (a later one replaces an earlier one of the same key),
        with the conditions of ``conditional`` attached and sorted parents first."""
        by_name: dict[str, Param] = {}
        for override in overrides:
            param = _param(override)
            by_name[param.name] = param
        for child, parents in (conditional or {}).items():
            where = f"hydra.sweeper.conditional.{child}"
            if child not in by_name:
                raise SearchSpaceError(f"{where}: {child} is not in hydra.sweeper.params: add it there "
                                       "(or remove its condition)")
            if not isinstance(parents, Mapping) or not parents:
                raise SearchSpaceError(f"{where} must map parents to allowed values, e.g. {{divergence: [js, alpha]}}")
            for parent, allowed in parents.items():
                if parent not in by_name:
                    raise SearchSpaceError(f"{where}: its parent {parent} is not in hydra.sweeper.params: "
                                           f"add it (e.g. {parent}: choice(...))")
                if parent == child:
                    raise SearchSpaceError(f"{where}: a parameter cannot depend on itself")
                if isinstance(allowed, (str, int, float, bool)):
                    allowed = [allowed]
                by_name[child].conditions[str(parent)] = list(allowed)
        return cls(_parents_first(list(by_name.values())))

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.sampled]

    @property
    def conditional(self) -> bool:
        return any(p.conditions for p in self.params)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample the active parameters of one Optuna trial, parents first: name -> value (fixed
        parameters included, with their parsed value)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            d = p.distribution
            if d is None:
                values[p.name] = p.fixed_value
            elif isinstance(d, CategoricalDistribution):
                values[p.name] = trial.suggest_categorical(p.name, d.choices)
            elif isinstance(d, FloatDistribution):
                values[p.name] = trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)
            else:
                values[p.name] = trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
        return values

    def overrides(self, values: Mapping[str, Any]) -> list[str]:
        """The job overrides for the values of ``suggest``."""
        return [p.override(values[p.name]) for p in self.params if p.name in values]

    def grid(self) -> dict[str, list[Any]]:
        """name -> values, for Optuna's GridSampler (every sampled parameter must be finite)."""
        if self.conditional:
            raise SearchSpaceError("hydra.sweeper.sampler.name=grid does not support hydra.sweeper.conditional: "
                                   "use tpe or random, or sweep each branch separately")
        space = {}
        for p in self.sampled:
            if p.grid is None:
                raise SearchSpaceError(f"hydra.sweeper.params.{p.name}: the grid sampler needs finite values; "
                                       "use choice(...) or range(...) instead of interval(...)")
            space[p.name] = p.grid
        return space

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size


def _parents_first(params: list[Param]) -> list[Param]:
    """Stable topological order: each parameter after its parents, otherwise as declared."""
    ordered: list[Param] = []
    placed: set[str] = set()
    pending = list(params)
    while pending:
        ready = next((p for p in pending if set(p.conditions) <= placed), None)
        if ready is None:
            cycle = ", ".join(p.name for p in pending)
            raise SearchSpaceError(f"hydra.sweeper.conditional has a cycle among {cycle}: a parent cannot depend on its child")
        ordered.append(ready)
        placed.add(ready.name)
        pending.remove(ready)
    return ordered


def fixed_overrides(overrides: Sequence[Override], exclude: Sequence[str] = ()) -> dict[str, str]:
    """name -> override text of the overrides that give a fixed value (no sweep), leaving out
    ``hydra.*`` keys, the ``trial`` key the sweeper sets, and the names in ``exclude`` (the search
    space's parameters): what a study records as the setting all its trials share."""
    fixed: dict[str, str] = {}
    for override in overrides:
        if override.is_sweep_override():
            continue
        param = _param(override)
        key = param.name.split(":")[-1]
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key == "trial" or param.name in exclude:
            continue
        fixed[param.name] = param.fixed_override
    return dict(sorted(fixed.items()))
