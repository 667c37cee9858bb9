"""The Ray executor: work units as tasks of long-lived actors, with retries.

One actor per ``--cpus-per-task/--gpus-per-task`` slot. Each actor calls a picklable worker
factory once (loading models once per actor) and then runs the worker on unit after unit; the
driver only hands out units and collects what the worker returns (row counts in the pipeline).
A killed actor is restarted and its unit retried (``--max-retries``); exceptions are retried too.
Units failing every retry are reported, never dropped; the others go on. This module knows
nothing about scoring: the pipeline passes the factory.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mimicfilter.errors import MimicfilterError

TASKS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: an actor never waits on the driver


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs the units.

    ``address``: ``local`` starts (or, with RAY_ADDRESS set, joins) a Ray instance on this machine;
    ``auto`` joins the cluster this machine belongs to; ``ray://host:10001`` connects a client.
    """

    address: str = "local"
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    actors: int | None = None  # default: as many as the cluster's resources fit, at most one per unit

    def __post_init__(self):
        if not self.cpus_per_task > 0:
            raise MimicfilterError(f"--cpus-per-task {self.cpus_per_task}: must be positive")
        if self.gpus_per_task < 0:
            raise MimicfilterError(f"--gpus-per-task {self.gpus_per_task}: must be 0 or more")
        if self.max_retries < 0:
            raise MimicfilterError(f"--max-retries {self.max_retries}: must be 0 or more")
        if self.actors is not None and self.actors < 1:
            raise MimicfilterError(f"--ray-actors {self.actors}: must be at least 1")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MimicfilterError("--ray needs the ray package", hint="pip install 'mimicfilter[ray]' (or pip install ray)") from None
    return ray


def _connect(ray, config: RayConfig) -> bool:
    """Initialise Ray unless the caller already did; returns True when we must shut it down."""
    if ray.is_initialized():
        return False
    address = None if config.address == "local" else config.address
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise MimicfilterError(
            f"cannot connect to Ray at {config.address}: {' '.join(str(error).split())[:200]}",
            hint="start the cluster (ray start --head) or use --ray without an address for a local instance",
        ) from error
    return True


def _actor_count(ray, config: RayConfig, units: int) -> int:
    if config.actors is not None:
        return min(config.actors, units)
    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 1) / config.cpus_per_task)
    if config.gpus_per_task:
        fits = min(fits, math.floor(resources.get("GPU", 0) / config.gpus_per_task))
        if fits < 1:
            raise MimicfilterError(
                f"the Ray cluster has {resources.get('GPU', 0):g} GPU(s); --gpus-per-task {config.gpus_per_task:g} fits none",
                hint="add GPU nodes or lower --gpus-per-task (0 for CPU scoring)",
            )
    return max(1, min(fits, units))


class WorkerActor:
    """Holds one worker (built once by the factory) and runs it on units."""

    def __init__(self, worker_factory: Callable[[], Callable[[Any], int]], threads: int):
        import torch

        torch.set_num_threads(threads)  # actors share the node: no oversubscription
        self.worker = worker_factory()

    def run(self, unit: Any) -> int:
        return self.worker(unit)


@dataclass(frozen=True)
class RayResult:
    total: int  # the sum of what the workers returned
    units_done: int
    actors: int
    failures: tuple[str, ...]  # "UNIT: why", for units that failed every retry


def _describe(ray, error: Exception) -> str:
    """One line for a failed task: the user exception it raised, or how its actor died."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    if isinstance(error, ray.exceptions.RayActorError):
        return "its worker actor died (killed, or out of memory) more often than --max-retries allows"
    return " ".join(str(error).split())[:300]


def run_with_ray(
    units: Sequence[Any],
    worker_factory: Callable[[], Callable[[Any], int]],
    config: RayConfig,
    on_done: Callable[[Any, int], None] | None = None,
) -> RayResult:
    """Run ``worker_factory()(unit)`` for every unit on Ray actors; ``on_done(unit, result)`` as each finishes."""
    ray = _import_ray()
    owns_ray = _connect(ray, config)
    try:
        if not units:
            return RayResult(0, 0, 0, ())
        count = _actor_count(ray, config, len(units))
        actor_class = ray.remote(
            num_cpus=config.cpus_per_task,
            num_gpus=config.gpus_per_task,
            max_restarts=config.max_retries,
            max_task_retries=config.max_retries,
        )(WorkerActor)
        threads = max(1, int(config.cpus_per_task))
        actors = [actor_class.remote(worker_factory, threads) for _ in range(count)]
        queue = deque(units)
        in_flight: dict[Any, tuple[Any, Any]] = {}

        def submit(actor) -> None:
            if queue:
                unit = queue.popleft()
                call = actor.run.options(retry_exceptions=True)  # I/O errors too, up to --max-retries
                in_flight[call.remote(unit)] = (actor, unit)

        for actor in actors:
            for _ in range(TASKS_IN_FLIGHT_PER_ACTOR):
                submit(actor)
        total = done_count = 0
        failures: list[str] = []
        dead: set[Any] = set()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, unit = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as error:  # retries exhausted: report, keep the others going
                failures.append(f"{unit}: {_describe(ray, error)}")
                if isinstance(error, ray.exceptions.RayActorError):
                    dead.add(actor)  # restarted max_retries times already: give its work to the others
                result = None
            if result is not None:
                total += result
                done_count += 1
                if on_done:
                    on_done(unit, result)
            survivors = [candidate for candidate in actors if candidate not in dead]
            if survivors:
                submit(actor if actor not in dead else survivors[0])
        failures.extend(f"{unit}: not attempted (every actor failed)" for unit in queue)
        for actor in actors:
            ray.kill(actor)
        return RayResult(total, done_count, count, tuple(failures))
    finally:
        if owns_ray:
            ray.shutdown()
