"""Executable plans: a program's computations cut into phases, each a TensorFlow function.

    plan = compile_plan(program, sources)      # in memory (fedlang run prog.fed)
    plan.save("prog.fedplan")                  # plan.json + one SavedModel per function
    plan = load_plan("prog.fedplan")           # validated; no compiler, no source, no pickle

plan.json holds the format name and version, the SHA-256 of the sources, every
computation's signature in type notation, and its phases in order: kind,
inputs and outputs (name, type, role, argument path), the aggregations at the
end of a client phase (operator, operands, attributes, the functions of a
federated_aggregate) and the function that runs the phase with its layout
(fedlang.backends.layout). A client phase is stored vectorized over a leading
client axis when the vectorizer can batch it (mode `vectorized`), else for one
client (mode `per_client`, run client by client). Server phases and aggregation
functions are unbatched (`server`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fedlang.backends import layout
from fedlang.ir.types import FederatedType, FunctionType, StructType, Type

FORMAT = "fedlang-plan"
VERSION = 1


class PlanError(Exception):
    """A plan that cannot be written, read or run (the message says what and how to fix it)."""


def _parse_type(text: str) -> Type:
    from fedlang.types import parse
    return parse(text)


@dataclass
class PlanFunction:
    """A function of the plan: interpreter values in, interpreter value out, through its
    flat layout. `run` is a tf.function (compiled) or a loaded SavedModel's function."""

    key: str
    in_types: list[Type]
    out_type: Type
    ragged: bool                    # the result's layout (and how the function builds sequences)
    run: Callable = None
    in_ragged: list[bool] | None = None   # per input; default: `ragged`

    def input_layouts(self) -> list[bool]:
        return self.in_ragged if self.in_ragged is not None else [self.ragged] * len(self.in_types)

    def __call__(self, *values: Any) -> Any:
        flat = []
        for v, t, r in zip(values, self.in_types, self.input_layouts()):
            layout.flatten(v, t, r, flat)
        out = self.call_flat(flat)
        arrays = [o.numpy() if hasattr(o, "numpy") else np.asarray(o) for o in out]
        return layout.unflatten_all(arrays, [self.out_type], self.ragged)[0]

    def call_flat(self, flat: list) -> list:
        """Run on flat arrays. The function's one concrete graph is called directly: the
        polymorphic tf.function entry costs more than a small round's whole graph."""
        call = self.__dict__.get("_fast")
        if call is None:
            call = self.__dict__["_fast"] = _fast_caller(self.run)
        return call(flat)

    def to_json(self) -> dict:
        return {"key": self.key, "inputs": [str(t) for t in self.in_types], "output": str(self.out_type),
                "ragged": self.ragged, "in_ragged": self.input_layouts(),
                "slots": [s.to_json() for t, r in zip(self.in_types, self.input_layouts())
                          for s in layout.slots(t, r)]}


def _fast_caller(run) -> Callable:
    import tensorflow as tf

    concrete = None
    try:
        if hasattr(run, "get_concrete_function"):
            concrete = run.get_concrete_function()
        elif getattr(run, "concrete_functions", None):
            concrete = run.concrete_functions[0]
    except (TypeError, ValueError):
        concrete = None
    if concrete is None or not hasattr(concrete, "_call_flat"):
        return lambda flat: run(*flat)
    specs = [s.dtype for s in concrete.structured_input_signature[0]] \
        if concrete.structured_input_signature else None
    captured = concrete.captured_inputs

    def call(flat: list) -> list:
        tensors = [tf.convert_to_tensor(a, d) for a, d in zip(flat, specs)] if specs else flat
        out = concrete._call_flat(tensors, captured)
        return out if isinstance(out, (list, tuple)) else [out]
    return call


@dataclass
class PhasePlan:
    index: int
    kind: str                       # server | client
    name: str
    mode: str                       # server | vectorized | per_client
    inputs: list[dict]              # name, type (member type), role, param (path) | batched (vectorized)
    outputs: list[dict]             # name, type, role
    aggregations: list[dict]        # op, value, result, type, weight, attrs, zero, functions {role: {key, captured}}
    function: PlanFunction
    rows: bool = False              # vectorized with per-step row counts (ragged batches)
    forward: list | None = None     # a server phase that only passes values on: per output [input, path..]
    fallback: PlanFunction | None = None   # vectorized phase: the phase for one client, for clients whose
                                           # tensors differ in shape outside sequences (no stacking)

    def to_json(self) -> dict:
        return {"index": self.index, "kind": self.kind, "name": self.name, "mode": self.mode, "rows": self.rows,
                "forward": self.forward, "fallback": self.fallback.key if self.fallback else None,
                "inputs": self.inputs, "outputs": self.outputs, "aggregations": self.aggregations,
                "function": self.function.key}


@dataclass
class ComputationPlan:
    name: str
    type: str                       # the signature in type notation
    params: list[tuple[str, str]]   # (name, type)
    phases: list[PhasePlan]
    result: Any                     # the result layout (see fedlang.ir.phases.Phases.result), JSON-able

    def to_json(self) -> dict:
        return {"type": self.type, "params": [list(p) for p in self.params],
                "phases": [p.to_json() for p in self.phases], "result": self.result}


@dataclass
class Plan:
    source_name: str
    source_sha256: str
    computations: dict[str, ComputationPlan]
    processes: dict[str, tuple[str, str]]
    functions: dict[str, PlanFunction] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)        # entries in source order
    skipped: dict[str, str] = field(default_factory=dict)  # comps this backend cannot lower: name -> why
    run_defaults: list[str] = field(default_factory=list)   # the source's `# fedlang run:` flags

    def manifest(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "source": self.source_name,
                "source_sha256": self.source_sha256, "order": self.order, "skipped": self.skipped,
                "run_defaults": self.run_defaults,
                "processes": {k: list(v) for k, v in self.processes.items()},
                "computations": {k: c.to_json() for k, c in self.computations.items()},
                "functions": {k: f.to_json() for k, f in self.functions.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan directory (atomically: a half-written plan never has the final name)."""
        import tensorflow as tf

        target = Path(path)
        if target.exists() and not (target / "plan.json").exists() and any(target.iterdir()):
            raise PlanError(f"{target} exists and is not a plan; choose another output path")
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            for key, f in self.functions.items():
                module = tf.Module()
                module.run = f.run
                tf.saved_model.save(module, str(work / "functions" / key))
            (work / "plan.json").write_text(json.dumps(self.manifest(), indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


# ==== compiling =====================================================================================

def source_digest(sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    return h.hexdigest()


def compile_plan(program, source_name: str, sources: dict[str, str]) -> Plan:
    """Lower every root `comp` of an optimized IR program (and its processes) to a plan; a comp
    this backend cannot lower is listed in `skipped` with the reason."""
    from fedlang.backends.tensorflow.lower import LoweringError
    from fedlang.ir.phases import PhaseSplitError

    # the root module's processes (an imported module's are not entry points), and every comp they
    # or the root module name (a process may name an imported comp: `next = lib.round`)
    processes = {k: v for k, v in program.processes.items() if k in program.root}
    plan = Plan(source_name, source_digest(sources), {}, processes)
    names = list(program.root)
    names += [c for pair in processes.values() for c in pair if c not in names]
    for name in names:
        function = program.functions.get(name)
        if function is None or not function.federated:
            continue
        try:
            _compile_computation(plan, name, function, program)
        except (LoweringError, layout.LayoutError, PhaseSplitError) as error:
            plan.skipped[name] = str(error)
            for key in [k for k in plan.functions if k.startswith(name + ".")]:
                del plan.functions[key]
    for process, (init, nxt) in list(plan.processes.items()):
        if init in plan.skipped or nxt in plan.skipped:
            del plan.processes[process]
            plan.skipped[process] = f"its computation {init if init in plan.skipped else nxt} cannot be lowered"
    return plan


def _compile_computation(plan: Plan, name: str, function, program) -> None:
    from fedlang.backends.tensorflow.lower import phase_function
    from fedlang.ir.batching import NotVectorizable, vectorize
    from fedlang.ir.graph import Program
    from fedlang.ir.phases import split_phases

    phases = split_phases(function, program)
    comp = ComputationPlan(name, str(function.type), [(n, str(t)) for n, t in function.params], [],
                           _json_layout(phases.result))
    for phase in phases:
        key = f"{name}.{phase.index}.{phase.name}"
        sub = Program(dict(phase.globals))
        inputs = [{"name": v.name, "type": str(v.type), "role": v.role,
                   "param": list(v.param) if v.param is not None else None} for v in phase.inputs]
        mode, rows = "server", False
        fn = phase.function
        if phase.kind == "client":
            batched = [_per_client(v, function) for v in phase.inputs]
            for entry, v, b in zip(inputs, phase.inputs, batched):
                entry["batched"] = b
                # an all-equal value at CLIENTS is passed as a list with one (equal) entry per client
                entry["listed"] = b or _at_clients(v, function)
            try:
                fn, rows = _vectorize(vectorize, phase.function, tuple(batched), sub)
                mode = "vectorized"
            except NotVectorizable:
                mode = "per_client"
        ragged = mode != "vectorized"
        # unbatched inputs of a vectorized phase (broadcasts, all-equal values) keep the ragged layout
        in_ragged = [True] * len(fn.params) if ragged else [not e["batched"] for e in inputs]
        pf = PlanFunction(key, [t for _, t in fn.params], fn.type.result, ragged,
                          _traced(phase_function(fn, sub, ragged, in_ragged=in_ragged)), in_ragged)
        plan.functions[key] = pf
        aggregations = []
        for k, agg in enumerate(phase.aggregations):
            entry = {"op": agg.op, "value": agg.value, "result": agg.result, "type": str(agg.type),
                     "weight": agg.weight, "attrs": {a: _json_attr(v) for a, v in agg.attrs},
                     "zero": agg.zero, "functions": {}}
            for role, f, captured in agg.functions:
                fkey = f"{key}.{agg.result}.{role}"
                captured_types = [t for _, t in f.captures]
                plan.functions[fkey] = PlanFunction(
                    fkey, [t for _, t in f.params] + captured_types, f.type.result, True,
                    _traced(phase_function(f, Program(dict(phase.globals)), True, captured_types)))
                entry["functions"][role] = {"key": fkey, "captured": list(captured),
                                            "arity": len(f.params)}
            aggregations.append(entry)
        outputs = [{"name": v.name, "type": str(v.type), "role": v.role} for v in phase.outputs]
        fallback = None
        if mode == "vectorized" and any(_has_free_dim(t) for (_, t), b in zip(phase.function.params, batched) if b):
            fallback = PlanFunction(key + ".per_client", [t for _, t in phase.function.params],
                                    phase.function.type.result, True,
                                    _traced(phase_function(phase.function, sub, True)))
            plan.functions[fallback.key] = fallback
        comp.phases.append(PhasePlan(phase.index, phase.kind, phase.name, mode, inputs, outputs,
                                     aggregations, pf, rows,
                                     _forwarding(phase.function) if phase.kind == "server" else None, fallback))
    plan.computations[name] = comp
    plan.order.append(name)


def _traced(run):
    """`run` traced now, so what the backend cannot lower is found while compiling (and the
    comp listed as skipped), not in the middle of a run."""
    run.get_concrete_function()
    return run


def _forwarding(function) -> list | None:
    """[input index, field path..] per output when the phase only passes its inputs on (a
    server_prepare that broadcasts the state, a server_update that returns the aggregates):
    the runtime then skips the graph call, which would cost more than the round's work."""
    result = function.node(function.result)
    if result.prim.name != "struct":
        return None
    out = []
    for nid in result.inputs:
        node, path = function.node(nid), []
        while node.prim.name == "select":
            path.append(node.attr("index"))
            node = function.node(node.inputs[0])
        if node.prim.name != "param":
            return None
        out.append([node.attr("index")] + path[::-1])
    return out


def _vectorize(vectorize, function, batched, program) -> tuple[Any, bool]:
    """The vectorized phase and whether its sequences carry per-step row counts (batches of
    different sizes at one step, e.g. short last batches); NotVectorizable otherwise."""
    import inspect

    from fedlang.ir.batching import NotVectorizable

    if any(_has_row_leaf(t) for (_, t), b in zip(function.params, batched) if not b):
        # a shared sequence of batches (a broadcast data set) has no row counts to pad it by
        raise NotVectorizable("a sequence of batches every client shares")
    if "rows" in inspect.signature(vectorize).parameters:
        return vectorize(function, batched, program, ragged=True, rows=True), True
    if any(_has_row_leaf(t) for (_, t), b in zip(function.params, batched) if b):
        raise NotVectorizable("batches of different sizes need per-step row counts")
    return vectorize(function, batched, program, ragged=True), False


def _has_free_dim(t: Type) -> bool:
    """A `?` in a tensor outside sequences: clients may hold different shapes, which no stacking
    pads (sequences of batches carry row counts instead)."""
    from fedlang.ir.types import SequenceType, TensorType
    if isinstance(t, TensorType):
        return None in t.shape
    if isinstance(t, StructType):
        return any(_has_free_dim(f) for f in t.types)
    return False


def _has_row_leaf(t: Type) -> bool:
    from fedlang.ir.types import SequenceType, leaves
    if isinstance(t, SequenceType):
        return any(leaf.rank >= 1 and leaf.shape[0] is None for leaf in leaves(t.element))
    if isinstance(t, StructType):
        return any(_has_row_leaf(f) for f in t.types)
    return False


def _per_client(v, comp) -> bool:
    """Whether a client phase input differs per client (is batched when vectorized)."""
    if v.role == "client":
        return True
    t = _param_type(v, comp)
    return isinstance(t, FederatedType) and not t.all_equal


def _at_clients(v, comp) -> bool:
    from fedlang.ir.types import Placement
    t = _param_type(v, comp)
    return isinstance(t, FederatedType) and t.placement is Placement.CLIENTS


def _param_type(v, comp) -> Type | None:
    """The declared type of the comp argument a `param` input comes from (its federated part)."""
    if v.role != "param":
        return None
    t = comp.params[v.param[0]][1]
    for k in v.param[1:]:
        if isinstance(t, FederatedType):
            break
        t = t.types[k]
    return t


def _json_attr(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_json_attr(v) for v in value]
    return str(value)


def _json_layout(result: tuple) -> Any:
    if result[0] == "struct":
        return ["struct", list(result[1]), [_json_layout(p) for p in result[2]]]
    return [result[0], result[1]]


# ==== loading =======================================================================================

def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan directory written by `Plan.save`."""
    root = Path(path)
    manifest_path = root / "plan.json"
    if not root.is_dir():
        raise PlanError(f"{root}: no such plan directory (write one with `fedlang compile PROG.fed -o {root}`)")
    if not manifest_path.is_file():
        raise PlanError(f"{root}: not a plan: plan.json is missing (write a plan with `fedlang compile PROG.fed -o {root}`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"{manifest_path}: corrupt plan manifest ({error}); compile the plan again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PlanError(f"{manifest_path}: not a fedlang plan manifest")
    if manifest.get("version") != VERSION:
        raise PlanError(f"{manifest_path}: plan format version {manifest.get('version')!r}, this fedlang reads "
                        f"version {VERSION}; compile the plan again with this fedlang")
    try:
        functions = {k: _load_function(root, k, f) for k, f in manifest["functions"].items()}
        computations = {}
        for name, c in manifest["computations"].items():
            phases = [PhasePlan(p["index"], p["kind"], p["name"], p["mode"], p["inputs"], p["outputs"],
                                p["aggregations"], functions[p["function"]], bool(p.get("rows", False)),
                                p.get("forward"), functions[p["fallback"]] if p.get("fallback") else None)
                      for p in c["phases"]]
            for p in phases:
                for agg in p.aggregations:
                    for ref in agg["functions"].values():
                        if ref["key"] not in functions:
                            raise KeyError(ref["key"])
            computations[name] = ComputationPlan(name, c["type"], [tuple(x) for x in c["params"]], phases,
                                                 c["result"])
        processes = {k: (v[0], v[1]) for k, v in manifest["processes"].items()}
        for k, (init, nxt) in processes.items():
            if init not in computations or nxt not in computations:
                raise KeyError(f"process {k}")
        return Plan(manifest["source"], manifest["source_sha256"], computations, processes, functions,
                    list(manifest["order"]), dict(manifest.get("skipped", {})))
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise PlanError(f"{manifest_path}: corrupt plan manifest (bad or missing entry {error}); "
                        f"compile the plan again") from None


def _load_function(root: Path, key: str, entry: dict) -> PlanFunction:
    import tensorflow as tf

    folder = root / "functions" / key
    if not (folder / "saved_model.pb").is_file():
        raise PlanError(f"{root}: the plan is incomplete: {folder.relative_to(root)}/saved_model.pb is missing; "
                        f"compile the plan again")
    in_types = [_parse_type(t) for t in entry["inputs"]]
    out_type = _parse_type(entry["output"])
    ragged = bool(entry["ragged"])
    in_ragged = [bool(r) for r in entry["in_ragged"]]
    expected = [layout.Slot.from_json(s) for s in entry["slots"]]
    if len(in_ragged) != len(in_types) or \
            expected != [s for t, r in zip(in_types, in_ragged) for s in layout.slots(t, r)]:
        raise PlanError(f"{root}: function {key}: its slots do not match its types; compile the plan again")
    try:
        module = tf.saved_model.load(str(folder))
        run = module.run
    except Exception as error:        # TensorFlow raises many kinds for a corrupt SavedModel
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PlanError(f"{root}: function {key} cannot be loaded ({first}); compile the plan again") from None
    return PlanFunction(key, in_types, out_type, ragged, run, in_ragged)
