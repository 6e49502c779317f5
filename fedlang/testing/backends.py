"""Run a computation on the reference interpreter and on the TensorFlow backend, and compare.

TensorFlow is imported only when `assert_backends_agree` first runs, so
`import fedlang.testing` stays light. Plans are compiled once per program.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedlang.testing.compare import first_difference, show

__all__ = ["BackendCannotRun", "assert_backends_agree", "run_interpreter", "run_tensorflow"]


class BackendCannotRun(Exception):
    """The TensorFlow backend cannot run this computation (an `fn`, or a comp the plan skips)."""


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # IR program -> plan
_LOADED: dict = {}                                                   # (path, mtime) -> fedlang.api.Loaded


def _resolve(comp: Any):
    """(Computation, display name) of a `fedlang.load(path).NAME` or a (path, name) pair."""
    if isinstance(comp, tuple) and len(comp) == 2 and isinstance(comp[1], str):
        import fedlang

        path, name = comp
        resolved = Path(path).resolve()
        key = (str(resolved), resolved.stat().st_mtime_ns)
        loaded = _LOADED.get(key)
        if loaded is None:
            loaded = _LOADED[key] = fedlang.load(str(path))
        comp = getattr(loaded, name)
    if not (hasattr(comp, "loaded") and hasattr(comp, "name") and hasattr(comp.loaded, "program")):
        raise TypeError("expected a computation (fedlang.load(path).NAME) or a (path, name) pair, "
                        f"got {comp!r}")
    if comp.name not in comp.loaded.program.functions or not hasattr(comp, "function"):
        raise TypeError(f"`{comp.name}` is a process: compare its computations "
                        "(prog.NAME for the init and next comps) instead")
    return comp


def _arguments(comp, args: Sequence[Any], clients: int | None):
    from fedlang.ir.types import FederatedType, Placement
    from fedlang.ir.values import conform

    params = comp.function.params
    if len(args) != len(params):
        raise TypeError(f"{comp.name} takes {len(params)} argument(s) ({comp.function.type}), got {len(args)}")
    values = [conform(a, t, f"{comp.name}: argument `{n}`") for a, (n, t) in zip(args, params)]
    counts = {len(v) for v, (_, t) in zip(values, params)
              if isinstance(t, FederatedType) and t.placement is Placement.CLIENTS}
    if clients is None:
        clients = getattr(args, "clients", None)
    if len(counts) > 1:
        raise ValueError(f"{comp.name}: every value at CLIENTS needs one entry per client; got {sorted(counts)}")
    if counts:
        (n,) = counts
        if clients is not None and clients != n:
            raise ValueError(f"{comp.name}: clients={clients} but the arguments hold {n} clients")
        clients = n
    return values, clients or 0


def run_interpreter(comp: Any, args: Sequence[Any], clients: int | None = None) -> Any:
    """The reference interpreter's result (an interpreter value, not converted to Python)."""
    comp = _resolve(comp)
    values, n = _arguments(comp, args, clients)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return comp.loaded.interpreter.call(comp.name, values, n)


def plan_of(comp: Any):
    """The TensorFlow plan of the program `comp` belongs to (compiled once per program)."""
    comp = _resolve(comp)
    program = comp.loaded.program
    plan = _PLANS.get(program)
    if plan is None:
        from fedlang.backends.tensorflow import import_quietly

        import_quietly()                 # TensorFlow without its start-up chatter, oneDNN reordering off
        from fedlang.backends.plan import compile_plan

        plan = _PLANS[program] = compile_plan(program, f"{comp.name}.fed", {})
    return plan


def run_tensorflow(comp: Any, args: Sequence[Any], clients: int | None = None,
                   clients_per_chunk: int | None = None) -> Any:
    """The TensorFlow backend's result: the computation's plan run by the local simulator."""
    comp = _resolve(comp)
    if not comp.function.federated:
        raise BackendCannotRun(f"`{comp.name}` is an fn: the TensorFlow backend runs comps (wrap it in a comp "
                               "with federated_map or federated_apply to test it there)")
    plan = plan_of(comp)
    if comp.name in plan.skipped:
        raise BackendCannotRun(f"the TensorFlow backend cannot run `{comp.name}`: {plan.skipped[comp.name]}")
    from fedlang.backends.simulator import Simulator

    values, n = _arguments(comp, args, clients)
    return Simulator(plan, clients_per_chunk=clients_per_chunk).call(comp.name, values, n)


def assert_backends_agree(comp: Any, args: Sequence[Any], rtol: float | None = None, atol: float | None = None,
                          *, clients: int | None = None, clients_per_chunk: int | None = None) -> Any:
    """Run `comp` on `args` with the reference interpreter and with the TensorFlow backend
    (the plan `fedlang compile -o` writes, run by the simulator of `fedlang run`) and raise
    AssertionError unless the results are equal: same structure, dtype and shape, floats to
    `rtol`/`atol` (by default per dtype: `fedlang.testing.DEFAULT_TOLERANCE`), NaN equal to NaN.

    `comp`: `fedlang.load(path).NAME` (a comp) or a `(path, name)` pair. `args`: one value per
    parameter, as the interpreter takes them (lists at CLIENTS; plain Python numbers are
    converted); `clients`: the number of clients when no argument is at CLIENTS (an
    `arguments(...)` draw carries it). `clients_per_chunk` as for `fedlang run`.
    Returns the interpreter's result. Raises `BackendCannotRun` for what the backend
    cannot run (an `fn`; a comp that passes a function value between phases)."""
    comp = _resolve(comp)
    values, n = _arguments(comp, args, clients)
    expected = run_interpreter(comp, values, n)
    got = run_tensorflow(comp, values, n, clients_per_chunk)
    found = first_difference(expected, got, rtol, atol)
    if found:
        shown = "\n".join(f"  {name} = {show(v, 1000)}" for (name, _), v in zip(comp.function.params, values))
        raise AssertionError(
            f"the reference interpreter and the TensorFlow backend disagree on `{comp.name}` ({n} clients)\n"
            f"first difference (interpreter vs TensorFlow): {found}\n"
            f"arguments:\n{shown or '  (none)'}\n"
            f"reference interpreter: {show(expected)}\n"
            f"TensorFlow backend:    {show(got)}")
    return expected
