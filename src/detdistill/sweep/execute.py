"""Training a sweep's runs: resumably, side by side on one machine, or on a Ray cluster.

A run whose ``summary.json`` says "completed" is read, not trained again; a run
with a ``last_state.pt`` resumes from it, so a killed sweep started again
continues where it stopped. Two sweeps may share a workdir: a lock file in a
run's directory (the host and pid of the process training it) keeps a run from
being trained twice at once; a lock left by a dead process on this host is taken
over.

On one machine runs are processes (spawned), one thread each on CPU (small
detectors use more threads poorly; several runs side by side use the cores
better), one GPU each when there are GPUs (``CUDA_VISIBLE_DEVICES``). Past one
machine Ray schedules the same function as tasks of one CPU (and one GPU when
asked); the workdir must then be on a file system every node sees.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml

from detdistill import jsonio
from detdistill.sweep.plan import Job, SweepError, SweepPlan

__all__ = ["LOCK_FILE", "claim", "completed", "recorded_threads", "run_job", "run_sweep"]

log = logging.getLogger(__name__)

LOCK_FILE = "method_table.lock"  # the name benchmarks/method_table.py has always used
WALL_FILE = "wall_time.json"
Backend = Literal["local", "ray"]


def completed(run_dir: Path) -> bool:
    """Whether ``run_dir``'s summary says it finished (an unreadable one: it did not)."""
    summary = run_dir / "summary.json"
    try:
        return json.loads(summary.read_text()).get("status") == "completed"
    except (OSError, ValueError):  # absent, or cut short by a crash of an older version
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim(run_dir: Path) -> str | None:
    """Mark ``run_dir`` as trained by this process; ``"host pid"`` of a live holder otherwise.

    Two processes training one run would both resume from and write to the same
    checkpoint. A lock of a dead process on this host is stale and taken over;
    one from another host cannot be checked and is respected (the message of
    :func:`run_job` names the file to delete if that process is gone).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    me = f"{socket.gethostname()} {os.getpid()}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        words = lock.read_text().split()  # "host pid"; older locks hold a bare pid
        host = words[0] if len(words) == 2 else socket.gethostname()
        pid = int(words[-1]) if words else 0
        holder = f"{host} {pid}"
        if holder != me and (host != socket.gethostname() or (pid and _alive(pid))):
            return holder
        lock.unlink(missing_ok=True)
        return claim(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return None


def _check_same_config(job: Job) -> None:
    """A finished or half-trained run of another config must not enter this table."""
    saved = job.run_dir / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != job.config:
        raise SweepError(
            f"{job.run_dir} holds a run of another config (see its config.yaml): "
            "sweep into another --workdir, or delete that run"
        )


def run_job(job: Job) -> dict[str, Any] | None:
    """Train one run (or read it, when finished) and return its result; None if another holds it.

    The result: job name, row, seed, final metrics, the weights ``auto`` chose
    (``summary.json``'s ``distill_weights``), epochs, wall time and run directory.
    """
    import torch

    from detdistill.engine.config import config_from_dict
    from detdistill.engine.trainer import run

    run_dir = job.run_dir
    _check_same_config(job)
    if not completed(run_dir):
        holder = claim(run_dir)
        if holder is not None:
            log.warning(
                "%s is being trained by %s: left out (delete %s if that process is gone)",
                job.name, holder, run_dir / LOCK_FILE,
            )  # fmt: skip
            return None
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(job.threads)
            start = time.perf_counter()
            resume = (run_dir / "last_state.pt").is_file()
            result = run(config_from_dict(job.config), resume=resume, show_progress=False)
            wall = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)  # the caller's, when the run trained in its process
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        if result.status != "completed":  # Ctrl-C or max_steps: no row, keep what is saved
            raise SweepError(
                f"{job.name} stopped ({result.status}); run the sweep again to resume it"
            )
        record = {"seconds": wall, "threads": job.threads}
        jsonio.write(run_dir / WALL_FILE, record)
    summary = json.loads((run_dir / "summary.json").read_text())
    wall_file = run_dir / WALL_FILE
    return {
        "name": job.name,
        "row": job.row,
        "seed": job.seed,
        "metrics": summary["metrics"],
        "chosen_weights": summary.get("distill_weights"),
        "epochs": summary.get("epoch"),
        "wall_time_s": json.loads(wall_file.read_text())["seconds"]
        if wall_file.is_file()
        else None,
        "threads": recorded_threads(run_dir),
        "run_dir": str(run_dir),
    }


def recorded_threads(run_dir: Path) -> int | None:
    """The torch thread count ``run_dir`` trained with (None: not recorded, e.g. older runs).

    On CPU a run's numbers depend on it: the same seed at 1 and at 2 threads
    trains to other weights.
    """
    wall_file = run_dir / WALL_FILE
    return json.loads(wall_file.read_text()).get("threads") if wall_file.is_file() else None


# --- local processes ---------------------------------------------------------------


def _worker_init(devices: Any) -> None:
    """Give this worker process one GPU of the queue (before CUDA starts), or none."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()


def _local(jobs: list[Job], workers: int, gpus: int) -> Iterator[dict[str, Any] | None]:
    """``run_job`` over ``jobs`` in ``workers`` spawned processes (in this one if 1 and no GPU)."""
    if workers == 1 and not gpus:
        yield from map(run_job, jobs)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    devices = None
    if gpus:
        devices = context.Queue()
        for index in range(workers):
            devices.put(str(index))
    env = {"OMP_NUM_THREADS": "1"} if not gpus else {}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # inherited by the spawned workers before torch loads there
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                 initargs=(devices,)) as pool:  # fmt: skip
            yield from pool.map(run_job, jobs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- Ray ---------------------------------------------------------------------------


def _ray(address: str | None) -> Any:
    """Ray, connected to ``address`` (imported here: an optional extra)."""
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs Ray: pip install 'detdistill[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray


def _on_ray(ray: Any, jobs: list[Job]) -> list[dict[str, Any] | None]:
    """Each job a Ray task of ``job.threads`` CPUs (at most a node's), one GPU if the cluster has any.

    Ray sets ``CUDA_VISIBLE_DEVICES`` of a task to the GPU it was given.
    """
    largest_node = max(
        (node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")), default=1
    )
    gpu = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    task = ray.remote(run_job)
    return ray.get(
        [
            task.options(num_cpus=min(job.threads, int(largest_node)), num_gpus=gpu).remote(job)
            for job in jobs
        ]
    )


# --- the sweep -------------------------------------------------------------------------


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _listed(numbers: set[int]) -> str:
    return " and ".join(str(n) for n in sorted(numbers))


def run_sweep(
    plan: SweepPlan,
    backend: Backend = "local",
    jobs: int | None = None,
    ray_address: str | None = None,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Train (or read) the teacher, then every student run; return the teacher's result and theirs.

    ``jobs``: runs side by side on this machine (default: one per GPU, else one
    per CPU core). With ``backend="ray"`` Ray places them, one CPU per student
    run and one GPU each where the cluster has GPUs; ``ray_address`` is
    ``ray.init``'s (None: the cluster this process runs in, or a new local one).
    Runs another process holds are left out of the returned list.
    """
    if backend == "ray":
        ray = _ray(ray_address)

        def execute(batch: list[Job], workers: int) -> list[dict[str, Any] | None]:
            return _on_ray(ray, batch)
    else:
        gpus = _gpus()

        def execute(batch: list[Job], workers: int) -> list[dict[str, Any] | None]:
            workers = max(1, min(workers, len(batch), gpus or workers))
            return list(_local(batch, workers, gpus))

    teacher = None
    if plan.teacher_job is not None:
        state = "reading" if completed(plan.teacher_job.run_dir) else "training"
        say(f"[sweep] {state} the teacher in {plan.teacher_job.run_dir}")
        teacher = execute([plan.teacher_job], 1)[0]
        if teacher is None:
            raise SweepError(
                f"the teacher in {plan.teacher_job.run_dir} is being trained by another "
                "process: run the sweep again when it is done"
            )
    # Finished runs are read here: no worker process or Ray task just to read a summary.
    pending = [job for job in plan.jobs if not completed(job.run_dir)]
    say(
        f"[sweep] {len(plan.jobs)} student runs, {len(plan.jobs) - len(pending)} finished "
        "earlier (not trained again)"
    )
    waiting = {job.name for job in pending}
    before = {recorded_threads(job.run_dir) for job in plan.jobs if job.name not in waiting}
    before.discard(None)
    now = {job.threads for job in pending}
    if before and now and before != now:
        say(
            f"[sweep] note: the finished runs trained with {_listed(before)} thread(s) each, "
            f"the {len(pending)} left will train with {_listed(now)}; on CPU a run's numbers "
            "depend on its thread count (--jobs sets it: one thread a run when runs go side "
            "by side, every core with --jobs 1)"
        )
    trained = execute(pending, jobs or os.cpu_count() or 1) if pending else []
    by_name = {job.name: result for job, result in zip(pending, trained, strict=True)}
    results = [by_name[job.name] if job.name in by_name else run_job(job) for job in plan.jobs]
    return teacher, [r for r in results if r is not None]
