"""Meta-schedule tuning of the graph outside the scan kernels, for `cpu-tvm` (lowering/tvm_relax.py calls it).

Without tuning, TVM's CPU pipeline leaves every legalized op (1x1 convolutions, layer norms, transposes) as plain
single-threaded loops. Here the legalized and fused Relax module is split into meta-schedule tasks (one per distinct
PrimFunc; the hand-scheduled scan kernels, tagged `tirx.is_scheduled`, are left out), the tasks the database does not
cover yet (or, with `retune`, all of them again, starting from their best records) are tuned on this machine within a
wall-clock budget, and the best schedule of every covered task is applied before compilation.

How rounds are shared out (`_TimeWeightedScheduler`): first one round for every task without a measurement, costliest
first; then each round goes to the task with the most measured time per image (best kernel time x calls) divided by the
square root of the rounds it already had. The few GEMM-shaped convolutions that hold most of the time get most of the
trials, instead of an equal share with ~70 tasks of which many take microseconds.

The database is meta-schedule's JSON pair (`database_workload.json`, `database_tuning_record.json`). The artifact keeps
a pruned copy (the best record per task of this model) in `tuning/`; a later build started from it (`--tune-db`
names that folder, a copy of it, or the artifact folder) finds every task covered and tunes nothing.

Tuning measures candidate kernels on the machine that builds: the target must describe this CPU (`mcpu` of the host),
and the measurement threads are the target's `num-cores`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import VMambaExportError

DB_FOLDER = "tuning"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TRIALS_PER_ITER = 8  # small rounds: the budget is checked after each round, and a round is cheap on 2 cores
POPULATION = 256  # evolutionary search population: TVM's 512 costs more search time than it saves on 2 cores
DEFAULT_TRIALS_PER_TASK = 256  # when only a time budget is given, the budget is what stops tuning
MAX_TRIALS_PER_TASK = 2048  # a task's own cap then: the costliest tasks can take many rounds of a long budget


@dataclass
class TuneSettings:
    budget_s: float | None = None  # wall-clock limit for measuring new schedules (None: no limit but the trials)
    max_trials: int | None = None  # total measured candidates (None: only the budget limits)
    db: Path | None = None  # database to start from: a folder with the JSON pair, or an artifact holding tuning/
    retune: bool = False  # also tune the tasks the database covers (the search starts from their best records)
    show_progress: bool = True

    @property
    def tunes(self) -> bool:
        return bool(self.budget_s) or bool(self.max_trials)


def database_folder(path: Path) -> Path:
    """The folder holding the JSON pair: `path` itself, or its `tuning/` (an artifact folder)."""
    path = Path(path)
    for folder in (path, path / DB_FOLDER):
        if (folder / WORKLOAD_FILE).is_file() and (folder / RECORD_FILE).is_file():
            return folder
    raise VMambaExportError(
        f"--tune-db {path}: no meta-schedule database there (expected {WORKLOAD_FILE} and {RECORD_FILE} in it or in "
        f"its {DB_FOLDER}/ folder)"
    )


def legalize(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Relax ops -> fused PrimFuncs, as the static-shape tuning pipeline does before tuning."""
    with target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)


def tuning_tasks(mod: tvm.IRModule, target) -> list:
    """Meta-schedule tasks of the legalized module, without the hand-scheduled kernels."""
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # extracted_tasks_to_tune_contexts checks the module's attributes, not the PrimFunc's: filter here.
    return [t for t in tasks if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]


def task_cost(task) -> float:
    """Estimated FLOPs of all calls of a task: tuning goes to the costliest tasks first."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * float(task.weight)
    except Exception:  # noqa: BLE001 (an op the estimator does not know: last in line, not an error)
        return 0.0


def light_tensor_intrinsics() -> None:
    """Register the x86 tensor intrinsics only, instead of `import tvm.s_tir.tensor_intrin` (which meta-schedule's
    TuneContext and its builders do). Why: that package parses hundreds of TVMScript intrinsics for CUDA, ROCm, Arm,
    Hexagon..., each parse calling inspect.stack(): 70 s of CPU in a fresh process, many minutes in one that has
    imported torch. The x86 rules of a CPU tuning need only x86.py. Installs a stub package in sys.modules (its
    __path__ is the real one, so submodules still import); a no-op once the real package is imported."""
    import importlib
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        stub = types.ModuleType(name, "x86 tensor intrinsics only (vmamba_export.lowering.tvm_tune)")
        stub.__path__ = list(spec.submodule_search_locations or [])
        stub.__spec__ = spec
        sys.modules[name] = stub
    importlib.import_module(name + ".x86")


@derived_object
class _PooledBuilder(ms.builder.PyBuilder):
    """meta-schedule's LocalBuilder, but keeping its worker processes between rounds: LocalBuilder starts fresh
    workers for every round of candidates, and each imports TVM (seconds on a loaded 2-core machine, more than the
    builds of a small round)."""

    def __init__(self, max_workers: int, timeout_sec: float = 300.0):
        from tvm.support.popen_pool import PopenPoolExecutor

        super().__init__()
        self.timeout_sec = timeout_sec
        # Each worker's first build would import all of tvm.s_tir.tensor_intrin (minutes on a loaded 2-core machine;
        # with a short timeout every worker was killed during that import, forever): register the x86 ones first.
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, initializer=light_tensor_intrinsics)

    def build(self, build_inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func
        from tvm.support.popen_pool import StatusKind

        results = []
        jobs = [(None, None, b.mod, b.target, None) for b in build_inputs]
        for res in self.pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
            if res.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {res.value}"))
        return results

    def close(self) -> None:
        self.pool.shutdown()


def _covered(database, task, target) -> bool:
    return database.query_tuning_record(task.dispatched[0], target, "main") is not None


def _mean_s(run_secs) -> float | None:
    """Mean of one candidate's measured times (seconds), None when it has none (a failed build or run)."""
    return sum(float(v) for v in run_secs) / len(run_secs) if run_secs else None


def _database_best_s(database, task, target) -> float | None:
    """Mean measured time of the task's best record in `database`, or None."""
    record = database.query_tuning_record(task.dispatched[0], target, "main")
    return None if record is None else _mean_s(record.run_secs)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """After each measured round: one progress line on stderr (a budget of minutes to hours needs a heartbeat)."""

    def __init__(
        self, start: float, budget_s: float | None, total_trials: int, names: list[str], best_s: list, show: bool
    ):
        super().__init__()
        self.start, self.budget_s, self.total_trials, self.names, self.show = start, budget_s, total_trials, names, show
        self.best_s = best_s  # best measured kernel time per task (None: none yet), shared with the scheduler
        self.trials = 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.trials += len(measure_candidates)
        times = [t for t in (_mean_s(r.run_secs) for r in runner_results) if t is not None]
        if times and (self.best_s[task_id] is None or min(times) < self.best_s[task_id]):
            self.best_s[task_id] = min(times)
        if self.show:
            limit = f"/{self.budget_s:.0f}" if self.budget_s else ""
            print(
                f"  tuning: {time.monotonic() - self.start:5.0f}{limit} s, {self.trials}/{self.total_trials} trials, "
                f"task {task_id + 1}/{len(self.names)} {self.names[task_id]}: best of round {_best_ms(runner_results)}",
                file=sys.stderr,
                flush=True,
            )


@derived_object
class _TimeWeightedScheduler(ms.task_scheduler.PyTaskScheduler):
    """Hands out rounds of measurements: first one to every task not yet measured (list order: costliest first), then
    to the task with the largest (measured time x calls) / sqrt(rounds so far), so a long budget goes where the time
    is; no new round once the wall-clock deadline has passed (TVM's scheduler then joins the rounds in flight and ends
    every task itself). Why not end tasks from a measure callback: the scheduler ends them again afterwards (a failed
    check, "!task->is_terminated"); and why not TVM's gradient scheduler: it builds a first round of every task before
    measuring any (half an hour for ~70 tasks on 2 cores), so a budget of minutes would measure nothing."""

    def __init__(self, deadline: float | None, weights: list[float], best_s: list):
        super().__init__()
        self.deadline = deadline
        self.weights = weights
        self.best_s = best_s  # filled by _Progress after each round; a database's best for retuned tasks
        self.task_rounds = [0] * len(weights)
        self.rounds = 0
        self.stopped = False

    def _pick(self, live: list[int]) -> int:
        unmeasured = [i for i in live if self.best_s[i] is None and self.task_rounds[i] == 0]
        if unmeasured:
            return unmeasured[0]
        # Tasks whose rounds all failed (no time) come last; ties go to the earlier (costlier by FLOPs) task.
        return max(live, key=lambda i: (self.weights[i] * (self.best_s[i] or 0.0)) / (1 + self.task_rounds[i]) ** 0.5)

    def next_task_id(self) -> int:
        sched = self._outer()
        n = len(sched.tasks_)
        for i in range(n):
            sched.touch_task(i)  # collects finished rounds (their measure callbacks run here)
        # At least one round: setting up (design spaces of every task) can outlast a budget of seconds.
        if self.deadline is not None and time.monotonic() >= self.deadline and self.rounds > 0:
            self.stopped = True
            return -1
        live = [i for i in range(n) if not sched.tasks_[i].is_terminated]
        if not live:
            return -1
        task_id = self._pick(live)
        if sched.tasks_[task_id].runner_futures:
            sched.join_running_task(task_id)
        self.task_rounds[task_id] += 1
        self.rounds += 1
        return task_id


def _best_ms(runner_results) -> str:
    times = [t for t in (_mean_s(r.run_secs) for r in runner_results) if t is not None]
    return f"{1e3 * min(times):.3f} ms" if times else "-"


def tune_and_apply(mod: tvm.IRModule, target, settings: TuneSettings, out_folder: Path) -> tuple[tvm.IRModule, dict]:
    """Legalize `mod`, tune what the database lacks (within the settings), apply the database; write the pruned
    database to `out_folder/tuning/`. Returns (module ready for `tvm.compile`, what the manifest records)."""
    mod = legalize(mod, target)
    tasks = tuning_tasks(mod, target)
    num_cores = int(target.attrs.get("num-cores", os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="vmamba-tvm-tune-") as tmp:
        work = Path(tmp)
        reused_from = None
        if settings.db is not None:
            src = database_folder(settings.db)
            reused_from = str(src)
            shutil.copy2(src / WORKLOAD_FILE, work / WORKLOAD_FILE)
            shutil.copy2(src / RECORD_FILE, work / RECORD_FILE)
        database = ms.database.JSONDatabase(work_dir=str(work), module_equality="structural")
        # Costliest first: the scheduler's first rounds go in list order, so a short budget tunes what matters.
        uncovered = [t for t in tasks if not _covered(database, t, target)]
        reused = len(tasks) - len(uncovered)
        pending = sorted(tasks if settings.retune else uncovered, key=task_cost, reverse=True)
        seconds = 0.0
        trials = 0
        stopped_by_budget = False
        if pending and settings.tunes:
            seconds, trials, stopped_by_budget = _tune(pending, target, settings, work, database, num_cores)
        # Best record per task of this model only: what the artifact keeps and a later build starts from.
        pruned = Path(out_folder) / DB_FOLDER
        pruned.mkdir(parents=True, exist_ok=True)
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (pruned / name).unlink(missing_ok=True)
        keep = ms.database.JSONDatabase(work_dir=str(pruned), module_equality="structural")
        for task in tasks:
            records = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
            if records:
                rec = records[0]
                keep.commit_tuning_record(
                    ms.database.TuningRecord(
                        rec.trace, keep.commit_workload(task.dispatched[0]), rec.run_secs, rec.target, rec.args_info
                    )
                )
        covered = sum(1 for t in tasks if _covered(keep, t, target))
        with target, keep:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        fallback = sample_untuned(mod, target, num_cores)
    info = {
        "method": "meta-schedule (evolutionary search, xgboost cost model)",
        "tasks": len(tasks),
        "tasks_covered": covered,  # tasks with a tuned schedule in the artifact's database
        "tasks_reused": reused,  # covered by the starting database (tuned again only with retune)
        "retune": settings.retune,
        "tasks_untuned": len(tasks) - covered,  # not measured: a sampled schedule, else TVM's default loops
        "tasks_sampled": fallback,  # of those, how many got an unmeasured sample of meta-schedule's design space
        "tuning_seconds": round(seconds, 1),
        "trials": trials,
        "budget_seconds": settings.budget_s,
        "max_trials": settings.max_trials,
        "stopped_by_budget": stopped_by_budget,
        "database": f"{DB_FOLDER}/",
        "database_from": reused_from,
        "measure_threads": num_cores,
    }
    return mod, info


def sample_untuned(mod: tvm.IRModule, target, num_cores: int) -> int:
    """Give every PrimFunc the database did not schedule one random, unmeasured sample of meta-schedule's design space
    (tiling, parallel, vectorise, unroll; postprocessed): a budget of minutes tunes a few of ~70 ops, and the rest as
    TVM's default single-threaded loops would cost seconds per image. Returns how many were replaced."""
    light_tensor_intrinsics()
    replaced = 0
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        try:
            ctx = ms.TuneContext(
                mod=tvm.IRModule({"main": func}),
                target=target,
                space_generator="post-order-apply",
                search_strategy="evolutionary",
                num_threads=num_cores,
                rand_state=replaced,
            )
            sch = ctx.generate_design_space()[-1]  # the last space: the multi-level tiled one when there are several
            for postproc in ctx.space_generator.postprocs:
                if not postproc.apply(sch):
                    raise RuntimeError(f"postprocessor {postproc} rejected the sample")
            new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception:  # noqa: BLE001 (no valid sample: the op keeps TVM's default loops, still correct)
            continue
        mod[gv] = new.with_attr("global_symbol", func.attrs["global_symbol"]) if "global_symbol" in func.attrs else new
        replaced += 1
    return replaced


def _tune(pending: list, target, settings: TuneSettings, work: Path, database, num_cores: int):
    """Tune `pending` into `database`; returns (seconds, trials measured, whether the budget stopped it)."""
    os.environ["TVM_NUM_THREADS"] = str(num_cores)  # the runner's worker processes measure with this many threads
    light_tensor_intrinsics()  # before TuneContext imports the whole package
    max_trials = settings.max_trials or DEFAULT_TRIALS_PER_TASK * len(pending)
    # Retuned tasks start with their database best, so the first rounds go to the tasks that have no measurement.
    best_s = [_database_best_s(database, t, target) for t in pending]
    contexts = [
        ms.TuneContext(
            mod=t.dispatched[0],
            target=t.target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=POPULATION),
            task_name=t.task_name,
            num_threads=num_cores,
            rand_state=i,
        ).clone()
        for i, t in enumerate(pending)
    ]
    start = time.monotonic()
    deadline = start + settings.budget_s if settings.budget_s else None
    names = [t.task_name for t in pending]
    callback = _Progress(start, settings.budget_s, max_trials, names, best_s, settings.show_progress)
    scheduler = _TimeWeightedScheduler(deadline, [float(t.weight) for t in pending], best_s)
    if settings.show_progress:
        budget = f"{settings.budget_s:.0f} s" if settings.budget_s else "no time limit"
        print(
            f"tuning {len(pending)} tasks on {num_cores} threads ({budget}, at most {max_trials} trials)",
            file=sys.stderr,
            flush=True,
        )
    builder = _PooledBuilder(max_workers=num_cores)
    try:
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[float(t.weight) for t in pending],
            work_dir=str(work),
            max_trials_global=max_trials,
            max_trials_per_task=settings.max_trials or MAX_TRIALS_PER_TASK,
            num_trials_per_iter=TRIALS_PER_ITER,
            builder=builder,
            runner=ms.runner.LocalRunner(
                # one worker process, one measurement at a time (two at once would share the cores they time)
                evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50),
            ),
            database=database,
            cost_model=ms.cost_model.XGBModel(num_tuning_cores=num_cores),
            measure_callbacks=[*ms.MeasureCallback.create("default"), callback],
            task_scheduler=scheduler,
        )
    finally:
        builder.close()
    return time.monotonic() - start, callback.trials, scheduler.stopped
