"""`fedlang run`: a plan's process for R rounds (or one computation) on bound client data.

A round samples `clients_per_round` of the source's clients with a generator
seeded by (seed, round) -- so a resumed run samples what an uninterrupted one
does -- drops each with probability `dropout` (same generator), binds the
survivors' data and calls the process's `next`. After every round the metrics
line is appended to metrics.jsonl (flushed to disk) and then the server state
is checkpointed atomically; `--resume DIR` reads the run's settings from
DIR/run.json, the state from DIR/checkpoint/ and continues, dropping metrics
lines of a round whose checkpoint was never written.

The round loop is the same for every runtime; only the executor of client
phases differs: the local simulator, or with `runtime="ray"` the Ray runtime
(fedlang.backends.ray_runtime), whose metrics lines also say `retried_shards`
and `lost_clients` (docs/distributed.md).

Out dir layout:  run.json  metrics.jsonl  checkpoint/{state.npz,checkpoint.json}
                 state.npz + state.json (final state)  result.json (a computation's result)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from fedlang.backends import layout
from fedlang.backends.plan import Plan, PlanError
from fedlang.backends.privacy import PrivacyLedger, noise_multiplier_of
from fedlang.backends.simulator import Simulator
from fedlang.ir.types import FederatedType, Placement, SequenceType, StructType, TensorType, Type
from fedlang.ir.values import Struct

DEFAULT_ROUNDS = 50
DEFAULT_CLIENTS_PER_ROUND = 10


class RunError(Exception):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class RunConfig:
    target: str
    entry: str | None = None
    rounds: int | None = None
    clients_per_round: int | None = None
    seed: int = 0
    data: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    batch_size: int | None = None
    clients_per_chunk: int | None = None
    dropout: float = 0.0
    out: str | None = None
    logdir: str | None = None
    dp_delta: float = 1e-5            # privacy accounting (docs/privacy.md)
    dp_accountant: str = "rdp"
    runtime: str = "local"             # local (the simulator) | ray (docs/distributed.md)
    address: str | None = None         # ray: None (a local instance), auto, ray://HOST:PORT
    num_workers: int | None = None     # ray: default one per CPU of the cluster


def _parse_type(text: str) -> Type:
    from fedlang.types import parse
    return parse(text)


# ---- choosing what to run and binding its parameters ---------------------------------------

def choose_entry(plan: Plan, entry: str | None) -> tuple[str, str | None]:
    """(computation to call each round or once, process name or None)."""
    if entry is not None and entry in plan.skipped:
        raise RunError(f"`{entry}` cannot run on this backend: {plan.skipped[entry]}")
    if entry is None and plan.skipped and not plan.processes and not plan.order:
        name, why = next(iter(plan.skipped.items()))
        raise RunError(f"`{name}` cannot run on this backend: {why}")
    if entry is not None:
        if entry in plan.processes:
            return plan.processes[entry][1], entry
        if entry in plan.computations:
            return entry, None
        names = sorted(plan.processes) + [n for n in plan.order if n not in plan.processes]
        raise RunError(f"the program has no process or comp `{entry}`; it has: {', '.join(names) or 'none'}")
    if plan.processes:
        name = next(iter(plan.processes))
        return plan.processes[name][1], name
    if plan.order:
        return plan.order[0], None
    raise RunError("the program has no process and no comp to run")


def _is_client_data(t: Type) -> bool:
    return isinstance(t, FederatedType) and t.placement is Placement.CLIENTS and not t.all_equal


def _data_defaults(member: Type) -> list[str]:
    """Built-in sources worth trying for a parameter, most specific first."""
    return ["digits", "sensors"]


@dataclass
class Binding:
    name: str
    member: Type
    spec: str
    source: Any
    chosen: bool = False        # picked automatically (no --data)


def bind_parameters(comp_params: list[tuple[str, Type]], config: RunConfig, skip_first: bool) -> tuple[list, list]:
    """Data bindings for the client parameters and values for the server ones."""
    from fedlang.backends.data import DataError, bind, open_source
    from fedlang.ir.values import conform

    bindings, fixed = [], {}
    params = comp_params[1:] if skip_first else comp_params
    unknown = set(config.data) - {n for n, _ in params}
    unknown |= set(config.args) - {n for n, _ in params}
    if unknown:
        raise RunError(f"no parameter named {', '.join(sorted(unknown))}; the parameters are "
                       f"{', '.join(n for n, _ in params) or 'none'}")
    for name, t in params:
        if _is_client_data(t):
            spec = config.data.get(name)
            if spec is not None:
                try:
                    source = open_source(spec)
                    bind(source, t.member, config.batch_size, [0] if source.client_ids else [])
                except DataError as error:
                    raise RunError(f"--data {name}={spec}: {error}") from None
                bindings.append(Binding(name, t.member, spec, source))
                continue
            for candidate in _data_defaults(t.member):
                try:
                    source = open_source(candidate)
                    bind(source, t.member, config.batch_size, [0])
                except DataError:
                    continue
                bindings.append(Binding(name, t.member, candidate, source, chosen=True))
                break
            else:
                raise RunError(f"parameter `{name}: {t}` needs client data and no built-in data set has that "
                               f"type; pass --data {name}=SPEC (see docs/data.md)")
        else:
            text = config.args.get(name)
            if text is None:
                raise RunError(f"parameter `{name}: {t}` needs a value; pass --arg {name}=VALUE (a number or "
                               f"JSON)")
            try:
                raw = json.loads(text)
            except json.JSONDecodeError:
                raise RunError(f"--arg {name}={text}: not a number or JSON value") from None
            member = t.member if isinstance(t, FederatedType) else t
            try:
                fixed[name] = conform(raw, member, f"--arg {name}")
            except TypeError as error:
                raise RunError(str(error)) from None
    return bindings, [fixed.get(n) for n, _ in params]


# ---- state files -----------------------------------------------------------------------------

def save_state(folder: Path, value: Any, t: Type, extra: dict) -> None:
    """Write state.npz (the state's flat layout) and a JSON file, atomically as a folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    arrays = layout.flatten(value, t, True)
    np.savez(work / "state.npz", **{f"a{i}": a for i, a in enumerate(arrays)})
    (work / "checkpoint.json").write_text(json.dumps({"type": str(t), **extra}, indent=1) + "\n")
    _fsync_dir(work)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)        # left by a save that was killed half-way
    if folder.exists():
        os.replace(folder, old)
    os.replace(work, folder)                      # killed before this line: `old` is the checkpoint
    shutil.rmtree(old, ignore_errors=True)


def saved_state(folder: Path) -> Path | None:
    """The folder holding the last complete save at `folder`: itself, or, when a save was killed
    between its two renames, the previous save it had moved aside; None if there is none."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "checkpoint.json").is_file() and (candidate / "state.npz").is_file():
            return candidate
    return None


def load_state(folder: Path) -> tuple[Any, dict]:
    folder = saved_state(folder) or folder
    for stale in folder.parent.glob(folder.name.split(".")[0] + ".*"):   # temporary folders of killed saves
        if stale.is_dir() and not stale.name.endswith(".old") and stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    info = json.loads((folder / "checkpoint.json").read_text())
    t = _parse_type(info["type"])
    with np.load(folder / "state.npz", allow_pickle=False) as data:
        arrays = [data[f"a{i}"] for i in range(len(data.files))]
    return layout.unflatten_all(arrays, [t], True)[0], info


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


# ---- metrics ---------------------------------------------------------------------------------

def metrics_dict(value: Any, prefix: str = "") -> dict[str, Any]:
    """A metrics value as flat JSON: struct fields joined by '/', scalars as numbers."""
    if value is None:
        return {}
    if isinstance(value, Struct):
        out: dict[str, Any] = {}
        for i, (n, v) in enumerate(value.items()):
            out.update(metrics_dict(v, f"{prefix}{n if n is not None else i}/"))
        return out
    key = prefix[:-1] or "value"
    array = np.asarray(value)
    if array.ndim == 0:
        item = array.item()
        return {key: item if not isinstance(item, float) or math.isfinite(item) else str(item)}
    return {key: array.tolist()}


def _summary(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.1e}" if 0 < abs(v) < 1e-3 else f"{k}={v:.4f}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return "  ".join(parts)


def format_value(value: Any) -> str:
    from fedlang.ir.values import to_python
    v = to_python(value)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, Struct):
        return "<" + ", ".join((f"{n}=" if n else "") + format_value(x) for n, x in v.items()) + ">"
    if isinstance(v, np.ndarray):
        return np.array2string(v, precision=4, threshold=20)
    if isinstance(v, list):
        inner = ", ".join(format_value(x) for x in v[:8])
        return f"[{inner}{', ...' if len(v) > 8 else ''}] ({len(v)} clients)"
    return str(v)


# ---- running ---------------------------------------------------------------------------------

class Runner:
    def __init__(self, plan: Plan, config: RunConfig, out: Path, stdout: TextIO | None = None,
                 progress: bool = True, executor: Simulator | None = None):
        """`executor`: a runtime to use instead of making one from `config` (e.g. Ray workers kept
        warm across runs of the same plan); the caller keeps it and closes it."""
        self.plan, self.config, self.out = plan, config, out
        self.stdout = stdout if stdout is not None else sys.stdout
        self.progress = progress
        self._owns_executor = executor is None
        self.sim = self._runtime() if executor is None else executor
        if hasattr(self.sim, "on_worker_loss"):
            self.sim.on_worker_loss = _on_worker_loss(config)

    def _runtime(self) -> Simulator:
        """The executor of client phases: the local simulator, or the Ray runtime (the round loop
        below is the same for both)."""
        cfg = self.config
        if cfg.runtime == "local":
            return Simulator(self.plan, cfg.clients_per_chunk)
        if cfg.runtime != "ray":
            raise RunError(f"unknown runtime {cfg.runtime!r}; the runtimes are local and ray")
        from fedlang.backends.ray_runtime import RaySimulator, RayUnavailable, require_ray
        try:
            require_ray()
        except RayUnavailable as error:
            raise RunError(str(error)) from None
        target = Path(cfg.target)
        plan_path = str(target.resolve()) if (target / "plan.json").is_file() else None
        return RaySimulator(self.plan, plan_path, cfg.num_workers, cfg.address, cfg.clients_per_chunk,
                            on_worker_loss=_on_worker_loss(cfg))

    def _start_runtime(self) -> None:
        if not hasattr(self.sim, "start"):
            return
        self.sim.start()
        hosts = sorted({w["host"] for w in self.sim.worker_info})
        self.say(f"runtime: ray, {len(self.sim.workers)} workers on {len(hosts)} node"
                 f"{'' if len(hosts) == 1 else 's'} ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''})")

    def _runtime_stats(self) -> dict:
        """retried_shards and lost_clients of the last call (the Ray runtime); {} locally."""
        return dict(getattr(self.sim, "last_stats", None) or {})

    def say(self, text: str) -> None:
        from tqdm import tqdm
        tqdm.write(text, file=self.stdout)
        self.stdout.flush()

    def run(self, resume: bool = False) -> int:
        comp_name, process = choose_entry(self.plan, self.config.entry)
        comp = self.plan.computations[comp_name]
        params = [(n, _parse_type(t)) for n, t in comp.params]
        try:
            if process is None:
                return self._run_once(comp_name, params)
            return self._run_process(process, comp_name, params, resume)
        finally:
            if self._owns_executor and hasattr(self.sim, "close"):
                self.sim.close()

    def _describe(self, bindings: list[Binding]) -> None:
        for b in bindings:
            how = " (built-in, chosen by type; pass --data to use another)" if b.chosen else ""
            self.say(f"data: {b.name} = {b.spec}: {len(b.source.client_ids)} clients{how}")

    def _bind(self, bindings: list[Binding], clients: list[int]) -> list:
        """The clients' data, bound chunk by chunk as the simulator reads it."""
        from fedlang.backends.data import BoundClients
        return [BoundClients(b.source, b.member, self.config.batch_size, clients, b.spec) for b in bindings]

    def _call(self, name: str, args: list) -> Any:
        from fedlang.backends.data import DataError
        from fedlang.backends.secagg import SecAggError
        try:
            return self.sim.call(name, args)
        except (DataError, SecAggError) as error:
            raise RunError(str(error)) from None
        except Exception as error:
            if type(error).__name__ == "SecureSumOnRay":
                raise RunError(str(error)) from None
            raise

    def _run_once(self, name: str, params: list) -> int:
        bindings, fixed = bind_parameters(params, self.config, skip_first=False)
        self._describe(bindings)
        self._start_runtime()
        n = _common_clients(bindings)
        data = iter(self._bind(bindings, list(range(n))))
        args = [next(data) if _is_client_data(t) else fixed[i] for i, (_, t) in enumerate(params)]
        start = time.perf_counter()
        result = self._call(name, args)
        seconds = time.perf_counter() - start
        self.out.mkdir(parents=True, exist_ok=True)
        comp_t = _parse_type(self.plan.computations[name].type)
        stats = self._runtime_stats()
        (self.out / "result.json").write_text(json.dumps(
            {"computation": name, "type": str(comp_t), "clients": n - stats.get("lost_clients", 0),
             "seconds": seconds, **stats, "result": metrics_dict(result)}, indent=1) + "\n")
        self.say(f"{name}({', '.join(n for n, _ in params)}) over {n} clients = {format_value(result)}")
        self.say(f"result written to {self.out / 'result.json'}")
        return 0

    def _run_process(self, process: str, next_name: str, params: list, resume: bool) -> int:
        from tqdm import tqdm

        init_name = self.plan.processes[process][0]
        cfg = self.config
        rounds = cfg.rounds if cfg.rounds is not None else DEFAULT_ROUNDS
        bindings, fixed = bind_parameters(params, cfg, skip_first=True)
        self._describe(bindings)
        self._start_runtime()
        total = _common_clients(bindings)
        per_round = min(cfg.clients_per_round or DEFAULT_CLIENTS_PER_ROUND, total)
        state_t = params[0][1].member if isinstance(params[0][1], FederatedType) else params[0][1]
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        start_round = 0
        if resume:
            state, info = load_state(self.out / "checkpoint")
            start_round = int(info["round"]) + 1
            _truncate_metrics(metrics_path, start_round)
            self.say(f"resuming {process} from {self.out} after round {start_round - 1}")
        else:
            (self.out / "run.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
            metrics_path.write_text("")
            state = self.sim.call(init_name, [])
        writer = _tensorboard(cfg.logdir)
        self.say(f"{process}: {rounds} rounds, {per_round} of {total} clients per round, seed {cfg.seed}"
                 + (f", dropout {cfg.dropout}" if cfg.dropout else "") + f"; writing {self.out}")
        bar = tqdm(total=rounds, initial=start_round, desc=process, unit="round", file=sys.stderr,
                   disable=not self.progress or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
        last: dict = {}
        ledger = _ledger(cfg, metrics_path, per_round / max(total, 1))
        try:
            for r in range(start_round, rounds):
                began = time.perf_counter()
                rng = np.random.default_rng([cfg.seed, r])
                selected = sorted(int(c) for c in rng.choice(total, per_round, replace=False))
                survivors = [c for c in selected if not (cfg.dropout and rng.random() < cfg.dropout)]
                line: dict[str, Any] = {"round": r}
                if not survivors:
                    line.update({"clients": 0, "dropped": len(selected), "skipped": True})
                    if hasattr(self.sim, "last_stats"):
                        line.update({"retried_shards": 0, "lost_clients": 0})
                    note = "no client survived: the state is kept"
                else:
                    data = iter(self._bind(bindings, survivors))
                    args = [state] + [next(data) if _is_client_data(t) else fixed[i]
                                      for i, (_, t) in enumerate(params[1:])]
                    out = self._call(next_name, args)
                    if isinstance(out, Struct) and out.names == ("state", "metrics"):
                        state, metrics = out["state"], out["metrics"]
                    else:
                        state, metrics = out, None
                    line.update(metrics_dict(metrics))
                    stats = self._runtime_stats()
                    counted = len(survivors) - stats.get("lost_clients", 0)
                    line.update({"clients": counted, "dropped": len(selected) - counted, **stats})
                    note = ""
                z = noise_multiplier_of(line)
                if z is not None:              # a DP process: the privacy spent so far
                    ledger.spend(per_round / max(total, 1), z)
                    line.update({"epsilon": ledger.epsilon(), "delta": ledger.delta})
                line["seconds"] = round(time.perf_counter() - began, 6)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                save_state(self.out / "checkpoint", state, state_t, {"round": r, "process": process})
                if writer is not None:
                    _write_scalars(writer, line, r)
                bar.update(1)
                shown = {k: v for k, v in line.items() if k not in ("round", "seconds", "skipped")}
                self.say(f"round {r + 1:>3}/{rounds}  {_summary(shown)}  ({line['seconds'] * 1000:.0f} ms)"
                         + (f"  {note}" if note else ""))
                last = line
        except KeyboardInterrupt:
            bar.close()
            self.say(f"interrupted; every finished round is saved. Resume with: "
                     f"fedlang run {cfg.target} --resume {self.out}")
            return 130
        bar.close()
        save_state(self.out / "final", state, state_t, {"round": rounds - 1, "process": process})
        for name in ("state.npz", "checkpoint.json"):
            os.replace(self.out / "final" / name, self.out / ("state.npz" if name == "state.npz" else "state.json"))
        shutil.rmtree(self.out / "final", ignore_errors=True)
        if writer is not None:
            writer.flush()
        final = {k: v for k, v in last.items() if k not in ("round", "seconds", "skipped", "clients", "dropped",
                                                            "retried_shards", "lost_clients")}
        self.say(f"done: {rounds} rounds; final {_summary(final) or 'state saved'}")
        self.say(f"metrics: {metrics_path}   final state: {self.out / 'state.npz'}")
        return 0


def _on_worker_loss(config: RunConfig) -> str:
    """A run with --dropout already aggregates over the clients that answer: the shard of a worker
    that dies counts as dropped. Without, the shard is retried on another worker."""
    return "drop" if config.dropout else "retry"


def _ledger(cfg: RunConfig, metrics_path: Path, rate: float) -> PrivacyLedger:
    """The privacy ledger of a run, with the rounds a resumed run keeps already spent."""
    ledger = PrivacyLedger(cfg.dp_delta, cfg.dp_accountant)
    if metrics_path.exists():
        for text in metrics_path.read_text().splitlines():
            z = noise_multiplier_of(json.loads(text)) if text.strip() else None
            if z is not None:
                ledger.spend(rate, z)
    return ledger


def _common_clients(bindings: list[Binding]) -> int:
    counts = {len(b.source.client_ids) for b in bindings}
    if len(counts) > 1:
        detail = ", ".join(f"{b.name}={b.spec} has {len(b.source.client_ids)}" for b in bindings)
        raise RunError(f"the client data sets have different numbers of clients ({detail})")
    return counts.pop() if counts else 0


def _truncate_metrics(path: Path, next_round: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] < next_round:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue                     # a line cut by the interruption
    path.write_text("".join(k + "\n" for k in kept))


def _tensorboard(logdir: str | None):
    if not logdir:
        return None
    import tensorflow as tf
    return tf.summary.create_file_writer(logdir)


def _write_scalars(writer, line: dict, step: int) -> None:
    """Scalars in TensorBoard's format, written with TensorFlow's own summary op: the
    `tensorboard` package (needed to view them) is not needed to write them."""
    import tensorflow as tf
    metadata = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for k, v in line.items():
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool):
                tf.summary.write(k, tf.constant(float(v), tf.float32), metadata=metadata)
