"""The Ray runtime: a plan's client phases run on Ray workers, its server phases in the driver.

    runtime = RaySimulator(plan, plan_path="prog.fedplan", num_workers=4, address="auto")
    runtime.start()                      # connect (or start a local Ray instance), start the workers
    state = runtime.call("initialize", [])
    out = runtime.call("round", [state, BoundClients(...)])
    runtime.last_stats                   # {"retried_shards": 0, "lost_clients": 0} of the last call
    runtime.close()                      # stop the workers (and the Ray instance it started)

`RaySimulator` is the local `Simulator` with another client-phase executor; the
call loop (server phases, result assembly) is the simulator's, so a round means
exactly what it means locally (docs/distributed.md):

* **Workers** are Ray actors (`ClientWorker`), started once. Each loads the plan
  with `load_plan` from the plan directory -- the path when it exists on the
  worker's node with the same plan.json, else the directory's files, shipped once
  through the object store and unpacked into a temporary folder. TensorFlow
  functions are never pickled. A worker keeps its plan loaded and its data
  sources open between rounds.
* **Shards.** The clients of a call are cut into contiguous shards, one per
  worker. For each client phase the driver puts the phase's broadcast values
  into the object store once and sends each worker its shard: for client data
  bound from a spec (`BoundClients`) only the spec, the member type, the batch
  size and the shard's client indices -- the worker opens the source itself and
  binds just its clients; other per-client arguments (lists from Python) travel
  as the shard's slice. The worker runs the simulator's chunk loop
  (`Simulator.run_clients`) on its shard and returns one partial aggregate per
  aggregation; the driver merges them in shard order and reports.
* **Aggregations that cannot be merged** (DEFERRED). A federated_aggregate folds
  `accumulate` over the clients one after the other, from `zero`, in client
  order: a worker cannot start its part before the previous shard's is done. A
  worker returns what each of its chunks would add (the clients' values, in
  order) instead of a partial, and the driver adds them in client order: the
  same halves, merge and report as in the simulator. A federated_secure_sum is
  refused (SecureSumOnRay): its clients' masking would have to run on the
  workers, and their plain values must never reach the driver.
* **Client values kept between client phases** (a comp that talks to its clients
  more than once) stay on the worker that computed them, keyed by (call,
  shard), and are released when the call ends. Client values that are part of
  the result are returned to the driver.
* **Faults.** A worker that dies during a shard (its process is killed, its node
  is lost) is restarted by Ray (`max_restarts`); the driver sees the lost task
  and either retries the shard on the next worker -- replaying the shard's
  earlier client phases of the call there when they kept client values -- or,
  with `on_worker_loss="drop"`, counts the shard's clients as dropped for the
  rest of the call (the round aggregates over the others; never the last live
  shard, and never in a call whose result has values at CLIENTS). Either way
  `last_stats` says so: `retried_shards`, `lost_clients`.

Test hook (not for users): while FEDLANG_RAY_TEST_KILL_MARKER=PATH is set and
PATH does not exist, the worker that gets shard 0 of the K-th client phase
dispatched since this runtime first saw PATH (K = FEDLANG_RAY_TEST_KILL_AT,
default 0) creates PATH (writing its pid) and kills its own process with
SIGKILL -- once: PATH then exists.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from fedlang.backends.aggregation import Aggregator
from fedlang.backends.plan import Plan, PhasePlan, PlanError
from fedlang.backends.simulator import Simulator, _argument

INSTALL_HINT = "pip install 'fedlang[ray]'  (or: pip install 'ray>=2.9')"
MAX_ATTEMPTS = 3            # a shard runs at most this many times before the call fails
MAX_RESTARTS = 10           # Ray restarts a dead worker at most this many times
START_TIMEOUT_S = 300.0     # the workers must be up (plan loaded) within this
BUILTIN_SPECS = ("digits", "sensors")
class SecureSumOnRay(Exception):
    """A plan with federated_secure_sum on the Ray runtime (not supported: see _client_phase)."""


# Aggregations whose partials cannot be merged: a federated_aggregate fold runs client after client
# from `zero`; a secure sum is one protocol session over all of a call's clients. Workers return
# what each chunk would add (the clients' values) and the driver adds them in client order.
DEFERRED = frozenset({"federated_aggregate", "federated_secure_sum"})


class RayUnavailable(Exception):
    """Ray is not installed (the message says how to install it)."""


class WorkerError(Exception):
    """A worker failed with an error that is not a lost worker (a bug, or a broken node)."""


def require_ray():
    """The `ray` module, or RayUnavailable saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--runtime ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def ray_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def loopback_settings() -> None:
    """Make a local Ray instance this process starts listen on 127.0.0.1 only and report no
    usage statistics. Ray binds its servers to the loopback interface only when the node's
    address is 127.0.0.1, and it turns a requested 127.0.0.1 into the machine's outward
    address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when Ray is imported; set here for
    the processes Ray starts, and patched in for a Ray already imported)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
    except (ImportError, AttributeError):
        pass


def init_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Start a local Ray instance on loopback only (no dashboard, quiet)."""
    import logging

    loopback_settings()
    ray = require_ray()
    # address="local": always a new instance, never a cluster `ray start` left on this machine
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False, **kwargs)


# ---- what travels to a worker --------------------------------------------------------------------

@dataclass
class PhaseTask:
    """One client phase for one shard."""
    comp: str
    phase: int                  # position in the computation's phases
    server: Any                 # ObjectRef of {name: value}: the phase's broadcast inputs
    inputs: list                # per phase input: see _shard_input
    size: int                   # clients in the shard
    offset: int                 # the shard's first client among the call's
    total: int                  # clients in the call
    defer: tuple = ()           # aggregations added at the driver (DEFERRED)
    replay: bool = False        # only rebuild the kept client values (a retried shard's earlier phase)


def _portable_spec(spec: str) -> str:
    """A data spec a worker can open whatever its working directory: a relative path made
    absolute (built-in names stay as they are)."""
    head = spec.partition(":")[0]
    if head in BUILTIN_SPECS or os.path.isabs(spec):
        return spec
    return os.path.join(os.getcwd(), spec)


def _shard_input(v: dict, args: Sequence[Any], shard: range):
    """What a worker needs of one phase input for its shard:
    None                                  a broadcast (from the phase's server values) or a kept value
    ("bound", spec, type, batch, clients) client data the worker binds itself from the spec
    ("values", values)                    the shard's slice of other per-client arguments
    ("value", value)                      an argument every client shares"""
    from fedlang.backends.data import BoundClients

    if v["role"] != "param":
        return None
    value = _argument(args, v["param"])
    if not v.get("listed"):
        return ("value", value)
    if isinstance(value, BoundClients) and value.spec is not None:
        import numpy as np
        return ("bound", _portable_spec(value.spec), str(value.member_type), value.batch_size,
                np.asarray(value.clients[shard.start:shard.stop], np.int64))
    return ("values", value[shard.start:shard.stop])


def _materialize(spec, sources: dict):
    """A phase input on the worker; `sources`: the worker's open sources by spec."""
    if spec is None:
        return None
    if spec[0] == "bound":
        from fedlang.backends.data import BoundClients, open_source
        _, data_spec, member, batch_size, clients = spec
        source = sources.get(data_spec)
        if source is None:
            # opened once per worker, like the driver opens it once per run (opening checks a
            # folder's listing, which costs as much as a small round for 10,000 files)
            source = sources[data_spec] = open_source(data_spec)
        return BoundClients(source, member, batch_size, clients, data_spec)
    return spec[1]


def plan_files(root: str | os.PathLike) -> dict[str, bytes]:
    """Every file of a plan directory, by its path relative to the directory."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the worker ----------------------------------------------------------------------------------

class ClientWorker:
    """A Ray actor that runs client phases of one plan on shards of clients (created through
    `ray.remote(ClientWorker)`; a plain class so that importing this module needs no Ray)."""

    def __init__(self, plan_path: str | None, digest: str, clients_per_chunk: int | None,
                 threads: int | None):
        from fedlang.backends.tensorflow import import_quietly

        import_quietly()
        if threads:
            import tensorflow as tf
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:            # TensorFlow already initialized in this process
                pass
        self.plan_path, self.digest, self.clients_per_chunk = plan_path, digest, clients_per_chunk
        self.plan: Plan | None = None
        self.loaded_from = None
        self.kept: dict[tuple[str, int], dict[str, list]] = {}
        self.sources: dict[str, Any] = {}

    def _load(self, files: list) -> None:
        """Load the plan once: from the driver's path when this node has it, else from the
        node's cache of shipped plans, else from the shipped files (`files`: [ObjectRef of
        {path: bytes}], fetched only then). Done here rather than in __init__, so that a
        restarted worker needs no constructor argument in the object store."""
        if self.plan is not None:
            return
        from fedlang.backends.plan import load_plan

        root = self.plan_path
        self.loaded_from = "path"
        if root is None or _digest_of(Path(root) / "plan.json") != self.digest:
            root = _cached_plan(self.digest)
            self.loaded_from = "node cache"
            if root is None:
                import ray
                root = _unpack(ray.get(files[0]), self.digest)
                self.loaded_from = "shipped files"
        self.plan = load_plan(root)
        self.sim = Simulator(self.plan, self.clients_per_chunk)

    def ready(self, files: list) -> dict:
        import socket
        self._load(files)
        return {"pid": os.getpid(), "host": socket.gethostname(), "plan": self.loaded_from}

    def forget(self, call_id: str) -> None:
        for key in [k for k in self.kept if k[0] == call_id]:
            del self.kept[key]

    def run(self, call_id: str, shard: int, tasks: list[PhaseTask], files: list,
            kill_marker: str | None = None):
        """Run `tasks` (earlier phases replayed, then one phase) for shard `shard` of call
        `call_id`: ("ok", result) or ("error", kind, message)."""
        if kill_marker is not None:
            _kill_once(kill_marker)
        try:
            self._load(files)
            result = None
            for task in tasks:
                result = self._run_phase(call_id, shard, task)
            return ("ok", result)
        except Exception as error:          # noqa: BLE001 - reported to the driver, which raises it
            import traceback
            from fedlang.backends.data import DataError
            kind = "data" if isinstance(error, DataError) else "plan" if isinstance(error, PlanError) else "other"
            text = str(error) if kind != "other" else traceback.format_exc()
            return ("error", kind, text)

    def _run_phase(self, call_id: str, shard: int, task: PhaseTask) -> dict | None:
        import ray

        began = time.perf_counter()
        phase = self.plan.computations[task.comp].phases[task.phase]
        server = ray.get(task.server) if isinstance(task.server, ray.ObjectRef) else task.server
        kept = self.kept.setdefault((call_id, shard), {})
        values = [kept[v["name"]] if v["role"] == "client" else _materialize(spec, self.sources)
                  for v, spec in zip(phase.inputs, task.inputs)]
        # federated_aggregate is deferred (never folded here), so no aggregation needs functions
        aggregators = [Aggregator(a["op"], self.sim.type_of(a["type"]), a["attrs"]) for a in phase.aggregations]
        group = self.sim.run_clients(phase, values, task.size, server, aggregators, offset=task.offset,
                                     total=task.total, defer=task.defer)
        roles = {o["name"]: o["role"].split("+") for o in phase.outputs}
        for name, vals in group.outputs.items():
            if "client" in roles[name]:
                kept[name] = vals
        if task.replay:
            return None
        return {"partials": group.partials, "deferred": group.deferred,
                "outputs": {n: v for n, v in group.outputs.items() if "result" in roles[n]},
                "seconds": time.perf_counter() - began}

def _plan_home() -> Path:
    return Path(tempfile.gettempdir()) / "fedlang-plans"


def _cached_plan(digest: str) -> str | None:
    target = _plan_home() / digest
    return str(target) if _digest_of(target / "plan.json") == digest else None


def _unpack(files: dict[str, bytes], digest: str) -> str:
    """The shipped plan as a directory on this node: $TMPDIR/fedlang-plans/SHA256-OF-PLAN.JSON,
    written once (atomically: unpacked beside it, then renamed) and reused by every worker of
    the node and by a restarted worker."""
    home = _plan_home()
    target = home / digest
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=home))
    for rel, data in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    try:
        os.replace(work, target)
    except OSError:
        if _digest_of(target / "plan.json") != digest:
            return str(work)                # a stale folder holds the name: use this copy
        shutil.rmtree(work, ignore_errors=True)     # another worker of this node was first
    return str(target)


def _digest_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _kill_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


# ---- the driver ----------------------------------------------------------------------------------

@dataclass
class _Call:
    """The state of one `call` across its client phases."""
    id: str
    comp: str
    drop_ok: bool
    shards: list[range] | None = None
    holder: list[int] = field(default_factory=list)          # shard -> worker index
    lost: set[int] = field(default_factory=set)
    history: dict[int, list[PhaseTask]] = field(default_factory=dict)   # shard -> phases done
    kept_any: bool = False
    retried: int = 0
    lost_clients: int = 0


class RaySimulator(Simulator):
    """The simulator with client phases sharded over Ray workers (see the module docstring).

    `plan_path`: the plan's directory when the plan was loaded from one (the workers load it
    from there when their node sees the same file); otherwise the plan is saved to a temporary
    directory first. `address`: None starts a local Ray instance (loopback only) unless this
    process has already connected to one or RAY_ADDRESS names a cluster; "auto" joins the
    cluster of this node (`ray start`); "ray://HOST:PORT" connects through Ray Client.
    `num_workers`: default one per free CPU of the cluster (each worker reserves one CPU and
    runs TensorFlow on one thread; with more workers than free CPUs they share).
    `on_worker_loss`: "retry" (default) or "drop" (see Faults)."""

    def __init__(self, plan: Plan, plan_path: str | os.PathLike | None = None, num_workers: int | None = None,
                 address: str | None = None, clients_per_chunk: int | None = None,
                 on_chunk: Callable[[int, int], None] | None = None, on_worker_loss: str = "retry"):
        super().__init__(plan, clients_per_chunk, on_chunk)
        if on_worker_loss not in ("retry", "drop"):
            raise ValueError(f"on_worker_loss must be 'retry' or 'drop', not {on_worker_loss!r}")
        self.plan_path = str(plan_path) if plan_path is not None else None
        self.num_workers = num_workers
        self.address = address
        self.on_worker_loss = on_worker_loss
        self.workers: list = []
        self.worker_info: list[dict] = []
        self.last_stats = {"retried_shards": 0, "lost_clients": 0}
        self._owns_ray = False
        self._call: _Call | None = None
        self._kill_seen: dict[str, int] = {}          # test hook: dispatches seen per marker
        self._down: dict[int, Any] = {}               # worker index -> probe (ObjectRef of ready())

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to Ray (or start a local instance) and start the workers; idempotent."""
        if self.workers:
            return
        ray = require_ray()
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None     # Ray's own variable
            if address is None:
                init_local_ray()
            else:
                import logging
                try:
                    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as error:
                    raise PlanError(f"cannot connect to the Ray cluster at {address}: "
                                    f"{_first_line(error)}; is it up (`ray start --head` on its head "
                                    f"node)? See docs/distributed.md") from None
            self._owns_ray = True
        # one CPU per worker where the CPUs are free; fewer free CPUs than workers: they share
        # (a worker that waited for a CPU held by another job would stall the run)
        cpus = float(ray.available_resources().get("CPU", 0.0))
        count = self.num_workers or max(1, int(cpus))
        per_worker = min(1.0, math.floor(cpus / count * 10_000) / 10_000)     # Ray's resolution
        files, digest = self._plan_payload()
        files_ref = ray.put(files)
        actor = ray.remote(ClientWorker).options(
            num_cpus=per_worker, max_restarts=MAX_RESTARTS, max_task_retries=0, scheduling_strategy="SPREAD")
        threads = max(1, int(per_worker))
        self._new_worker = lambda: actor.remote(self.plan_path, digest, self.clients_per_chunk, threads)
        self.workers = [self._new_worker() for _ in range(count)]
        self._files = [files_ref]       # in a list: a worker fetches the files only when it needs them
        try:
            self.worker_info = ray.get([w.ready.remote(self._files) for w in self.workers],
                                       timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise PlanError(f"the {count} Ray workers did not start within {START_TIMEOUT_S:.0f} s; does the "
                            f"cluster have the CPUs ({cpus:g} seen)?") from None
        except ray.exceptions.RayError as error:
            self.close()
            raise PlanError(f"the Ray workers could not start: {_first_line(error)}; every node needs "
                            f"fedlang installed ({INSTALL_HINT})") from None

    def _plan_payload(self) -> tuple[dict[str, bytes], str]:
        if self.plan_path is not None and (Path(self.plan_path) / "plan.json").is_file():
            files = plan_files(self.plan_path)
        else:
            work = tempfile.mkdtemp(prefix="fedlang-plan-")
            try:
                target = Path(work) / "plan.fedplan"
                self.plan.save(target)
                files = plan_files(target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            self.plan_path = None
        return files, hashlib.sha256(files["plan.json"]).hexdigest()

    def close(self) -> None:
        """Stop the workers, and the Ray instance if this runtime started it."""
        ray = require_ray()
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:               # noqa: BLE001 - already gone
                pass
        self.workers = []
        self._down = {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls ----------------------------------------------------------------------------------
    def call(self, name: str, args: Sequence[Any], clients: int | None = None) -> Any:
        comp = self.plan.computations.get(name)
        client_result = comp is not None and _has_client_result(comp.result)
        self._call = _Call(uuid.uuid4().hex, name, drop_ok=self.on_worker_loss == "drop" and not client_result)
        try:
            return super().call(name, args, clients)
        finally:
            call, self._call = self._call, None
            self.last_stats = {"retried_shards": call.retried, "lost_clients": call.lost_clients}
            if call.kept_any:
                for w in self.workers:
                    w.forget.remote(call.id)

    def _client_phase(self, phase: PhasePlan, args, n: int, server: dict, kept: dict, results: dict) -> None:
        import ray

        if any(a["op"] == "federated_secure_sum" for a in phase.aggregations):
            # the protocol's client steps would have to run on the workers; shipping the clients'
            # plain values to the driver instead would defeat secure aggregation
            raise SecureSumOnRay("federated_secure_sum does not run on the Ray runtime yet: its clients' "
                                 "protocol steps would need to run on the workers; use the local simulator "
                                 "(--runtime local)")
        self.start()
        call = self._call
        comp_name = call.comp
        position = next(k for k, p in enumerate(self.plan.computations[comp_name].phases) if p is phase)
        if call.shards is None:
            # as many shards as workers, whatever their health: the shards (and so the order of
            # summation) never depend on faults
            count = min(len(self.workers), n)
            bounds = [n * k // count for k in range(count + 1)] if count else [0]
            call.shards = [range(bounds[k], bounds[k + 1]) for k in range(count)]
            call.holder = [self._healthy_worker(k) for k in range(count)]
            call.history = {s: [] for s in range(count)}
        keeps = any("client" in o["role"].split("+") for o in phase.outputs)
        call.kept_any |= keeps
        defer = tuple(k for k, a in enumerate(phase.aggregations) if a["op"] in DEFERRED)
        server_ref = ray.put({v["name"]: server[v["name"]] for v in phase.inputs if v["role"] == "broadcast"})
        kill = self._kill_hook()
        pending: dict = {}
        tasks: dict[int, PhaseTask] = {}
        attempts: dict[int, int] = {}

        def submit(s: int, kill: str | None = None) -> None:
            todo = [tasks[s]]
            if call.holder[s] in self._down:
                # the worker that keeps this shard's client values is down: replay on another
                call.holder[s] = self._healthy_worker(call.holder[s] + 1)
                todo = self._replay(call, s) + todo
                if len(todo) > 1:
                    call.retried += 1
            worker = self.workers[call.holder[s]]
            pending[worker.run.remote(call.id, s, todo, self._files, kill)] = (s, call.holder[s])
            attempts[s] = attempts.get(s, 0) + 1

        self._refresh()
        for s, shard in enumerate(call.shards):
            if s in call.lost:
                continue
            tasks[s] = PhaseTask(comp_name, position, server_ref, [_shard_input(v, args, shard) for v in phase.inputs],
                                 len(shard), shard.start, n, defer)
            submit(s, kill if s == 0 else None)
        outs: dict[int, dict] = {}
        done = 0
        while pending:
            refs = list(pending)
            ray.wait(refs, num_returns=1)                  # the first to finish, then all finished:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)     # O(workers) per batch
            for ref in ready:
                s, worker = pending.pop(ref)
                try:
                    reply = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as error:
                    self._mark_down(worker)
                    if self._lost(call, s, attempts[s], error):
                        call.retried += 1
                        call.holder[s] = self._healthy_worker(worker + 1)
                        pending[self.workers[call.holder[s]].run.remote(
                            call.id, s, self._replay(call, s) + [tasks[s]], self._files)] = (s, call.holder[s])
                        attempts[s] += 1
                    continue
                if reply[0] == "error":
                    _raise_worker_error(reply)
                outs[s] = reply[1]
                call.history[s].append(tasks[s])
                done += len(call.shards[s])
                if self.on_chunk is not None:
                    self.on_chunk(done, n)
        self._finish(phase, server, results, outs, call)

    def _kill_hook(self) -> str | None:
        """The test hook (module docstring): the marker path when this dispatch's shard 0 must kill
        its worker."""
        marker = os.environ.get("FEDLANG_RAY_TEST_KILL_MARKER")
        if not marker or os.path.exists(marker):
            return None
        seen = self._kill_seen.get(marker, 0)
        self._kill_seen[marker] = seen + 1
        return marker if seen == int(os.environ.get("FEDLANG_RAY_TEST_KILL_AT") or 0) else None

    def _lost(self, call: _Call, s: int, attempt: int, error) -> bool:
        """Shard `s` lost its worker: True to retry it, False when it counts as dropped."""
        live = [k for k in range(len(call.shards)) if k not in call.lost]
        if call.drop_ok and len(live) > 1:
            call.lost.add(s)
            call.lost_clients += len(call.shards[s])
            return False
        if attempt >= MAX_ATTEMPTS:
            raise PlanError(f"a Ray worker died {attempt} times running shard {s} ({len(call.shards[s])} "
                            f"clients): {_first_line(error)}")
        return True

    def _replay(self, call: _Call, s: int) -> list[PhaseTask]:
        """The shard's earlier phases of the call that kept client values (they died with the
        worker), to run again, without their aggregates, before the next one."""
        return [replace(t, replay=True) for t in call.history[s]
                if any("client" in o["role"].split("+")
                       for o in self.plan.computations[t.comp].phases[t.phase].outputs)]

    # ---- worker health ---------------------------------------------------------------------------
    def _mark_down(self, w: int) -> None:
        """Worker `w` lost a task: send no more shards to it until a probe answers (Ray restarts
        it; a worker Ray gave up on is replaced by a new one)."""
        if w not in self._down:
            self._down[w] = self.workers[w].ready.remote(self._files)

    def _refresh(self) -> None:
        """Bring back the down workers whose probe answered; probe again those still restarting."""
        import ray

        for w, probe in list(self._down.items()):
            ready, _ = ray.wait([probe], timeout=0)
            if not ready:
                continue
            try:
                ray.get(probe)
                del self._down[w]
            except ray.exceptions.ActorDiedError:          # Ray will not restart it: a new worker
                ray.kill(self.workers[w], no_restart=True)
                self.workers[w] = self._new_worker()
                self._down[w] = self.workers[w].ready.remote(self._files)
            except ray.exceptions.RayError:                # restarting
                self._down[w] = self.workers[w].ready.remote(self._files)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every worker is up (after a fault, Ray restarts a worker in the background,
        and shards go to the others meanwhile)."""
        import ray

        deadline = time.monotonic() + timeout
        self._refresh()
        while self._down:
            if time.monotonic() > deadline:
                raise PlanError(f"{len(self._down)} Ray worker(s) still down after {timeout:.0f} s")
            ray.wait(list(self._down.values()), num_returns=len(self._down), timeout=1.0)
            self._refresh()

    def _healthy_worker(self, first: int) -> int:
        """The first worker from `first` on (cyclically) that is not down; waits for one to come
        back when all are."""
        import ray

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            count = len(self.workers)
            for k in range(count):
                if (first + k) % count not in self._down:
                    return (first + k) % count
            if time.monotonic() > deadline:
                raise PlanError(f"every Ray worker has been down for {START_TIMEOUT_S:.0f} s")
            ray.wait(list(self._down.values()), num_returns=1, timeout=1.0)
            self._refresh()

    def _finish(self, phase: PhasePlan, server: dict, results: dict, outs: dict[int, dict], call: _Call) -> None:
        """Merge the shards' partials in shard order (add the deferred aggregations' chunks in
        client order, numbering the clients of the surviving shards) and report."""
        order = sorted(outs)
        total = sum(len(call.shards[s]) for s in order)
        for k, spec in enumerate(phase.aggregations):
            agg = self._aggregator(spec, server)
            partial = agg.empty()
            offset = 0
            for s in order:
                if spec["op"] in DEFERRED:
                    for start, clients, value, weights in outs[s]["deferred"][k]:
                        partial = agg.add(partial, value, clients, weights, start=offset + start, total=total)
                    offset += len(call.shards[s])
                else:
                    partial = agg.merge(partial, outs[s]["partials"][k])
            server[spec["result"]] = agg.report(partial)
        names = {n for s in order for n in outs[s]["outputs"]}
        for name in names:
            results[name] = [v for s in order for v in outs[s]["outputs"][name]]


def _has_client_result(layout) -> bool:
    kind = layout[0]
    if kind == "struct":
        return any(_has_client_result(part) for part in layout[2])
    return kind not in ("server", "replicate")


def _raise_worker_error(reply) -> None:
    _, kind, text = reply
    if kind == "data":
        from fedlang.backends.data import DataError
        raise DataError(text)
    if kind == "plan":
        raise PlanError(text)
    raise WorkerError(f"a Ray worker failed:\n{text}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
