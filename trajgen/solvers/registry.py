"""The solver registry: ``@register(name, ...)`` on a plan-building function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trajgen.solvers.plan import PlanBuilder

BuildFn = Callable[..., None]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: ``build(builder, order, **options)`` appends its steps to ``builder``."""

    name: str
    build: BuildFn
    orders: tuple[int, ...]
    default_order: int
    stochastic: bool
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


SOLVERS: dict[str, SolverSpec] = {}


def register(name: str, *, orders: tuple[int, ...] = (1,), default_order: int | None = None,
             stochastic: bool = False, **options: Any) -> Callable[[BuildFn], BuildFn]:
    """Register a plan builder under ``name``; ``options`` are its keyword options with defaults."""

    def decorate(build: BuildFn) -> BuildFn:
        doc = (build.__doc__ or "").strip().splitlines()
        SOLVERS[name] = SolverSpec(name, build, orders, default_order or orders[-1], stochastic, dict(options),
                                   doc[0] if doc else "")
        return build

    return decorate


def get_solver(name: str) -> SolverSpec:
    """The spec of solver ``name``; unknown names raise a ValueError listing the known ones."""
    if name not in SOLVERS:
        raise ValueError(f"solver={name!r} is not a known solver; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def build_plan(spec: SolverSpec, builder: PlanBuilder, order: int | None, options: dict[str, Any]) -> int:
    """Validate order/options for ``spec`` and run its builder; returns the order used."""
    order = spec.default_order if order is None else order
    if order not in spec.orders:
        raise ValueError(f"order={order} is not supported by solver {spec.name!r}; supported orders: "
                         f"{spec.orders}")
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"solver {spec.name!r} has no option(s) {sorted(unknown)}; its options are "
                         f"{sorted(spec.options) or 'none'}")
    spec.build(builder, order, **{**spec.options, **options})
    return order
