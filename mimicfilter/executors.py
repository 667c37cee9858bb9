"""Executors for static scoring: which shards this process scores, and the Ray cluster executor.

The unit of work is :func:`mimicfilter.scoring.score_shard` (one shard → one atomic part; a part
that exists is done). Executors only decide *where* it runs:

* the local executor (DataLoader workers, in :mod:`mimicfilter.scoring`);
* :class:`Partition` — ``--rank R --world-size W`` for Slurm arrays and multi-node jobs without an
  engine: rank R takes every W-th shard of the expanded list, so the ranks are disjoint, cover every
  shard, and need no coordination beyond a shared run directory;
* :func:`score_with_ray` — one Ray actor per ``--cpus-per-task/--gpus-per-task`` slot, each
  loading the models once, scoring whole shards and writing the parts itself; the driver only
  hands out shard names and counts rows. A killed actor is restarted and its shard retried
  (``--max-retries``); finished parts are never recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from mimicfilter.errors import MimicfilterError

if TYPE_CHECKING:
    from mimicfilter.scoring import Progress, ScoreConfig

TASKS_IN_FLIGHT_PER_ACTOR = 2  # one scoring, one queued: an actor never waits on the driver


@dataclass(frozen=True)
class Partition:
    """This process's share of the shards: every ``world_size``-th shard starting at ``rank``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise MimicfilterError(f"--world-size {self.world_size}: must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise MimicfilterError(
                f"--rank {self.rank} is outside 0..{self.world_size - 1}",
                hint="ranks count from 0; with Slurm arrays use --rank $SLURM_ARRAY_TASK_ID",
            )

    @property
    def partitioned(self) -> bool:
        return self.world_size > 1

    def select(self, shards: Sequence[str]) -> list[str]:
        """Round-robin over the expanded shard list: balanced, deterministic, disjoint, complete."""
        return list(shards[self.rank :: self.world_size])


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs the shards.

    ``address``: ``local`` starts (or, with RAY_ADDRESS set, joins) a Ray instance on this machine;
    ``auto`` joins the cluster this machine belongs to; ``ray://host:10001`` connects a client.
    """

    address: str = "local"
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    actors: int | None = None  # default: as many as the cluster's resources fit, at most one per shard

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


def _actor_count(ray, config: RayConfig, shards: int) -> int:
    if config.actors is not None:
        return min(config.actors, shards)
    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 1) / config.cpus_per_task)
    if config.gpus_per_task:
        fits = min(fits, math.floor(resources.get("GPU", 0) / config.gpus_per_task))
        if fits < 1:
            raise MimicfilterError(
                f"the Ray cluster has {resources.get('GPU', 0):g} GPU(s); --gpus-per-task {config.gpus_per_task:g} fits none",
                hint="add GPU nodes or lower --gpus-per-task (0 for CPU scoring)",
            )
    return max(1, min(fits, shards))


class ShardScoringActor:
    """Holds one scorer (models loaded once per actor) and scores whole shards into their parts."""

    def __init__(self, config: "ScoreConfig", threads: int, shard_function: Callable | None = None):
        import torch

        from mimicfilter.scoring import build_scorer, score_shard

        torch.set_num_threads(threads)  # actors share the node: no oversubscription
        if not config.ray.gpus_per_task:  # no GPU asked for: never touch one Ray did not assign
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device="cpu"))
        self.config = config
        self.scorer = build_scorer(config)
        self.shard_function = shard_function or score_shard

    def score(self, shard: str) -> int:
        return self.shard_function(shard, self.scorer, self.config)


@dataclass(frozen=True)
class RayResult:
    samples_scored: int
    shards_scored: int
    actors: int
    failures: tuple[str, ...]


def _describe(ray, error: Exception) -> str:
    """One line for a failed task: the user exception it raised, or how its actor died."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    if isinstance(error, ray.exceptions.RayActorError):
        return "its scoring actor died (killed, or out of memory) more often than --max-retries allows"
    return " ".join(str(error).split())[:300]


def score_with_ray(
    config: "ScoreConfig",
    shards: Sequence[str],
    progress: "Progress | None" = None,
    shard_function: Callable | None = None,
) -> RayResult:
    """Score ``shards`` (those without a part) on Ray; parts are written by the actors.

    ``shard_function(shard, scorer, config) -> rows`` defaults to ``score_shard``; tests inject a
    wrapper that kills its process once to exercise retries.
    """
    ray_config: RayConfig = config.ray
    ray = _import_ray()
    owns_ray = _connect(ray, ray_config)
    try:
        if not shards:
            return RayResult(0, 0, 0, ())
        count = _actor_count(ray, ray_config, len(shards))
        actor_class = ray.remote(
            num_cpus=ray_config.cpus_per_task,
            num_gpus=ray_config.gpus_per_task,
            max_restarts=ray_config.max_retries,
            max_task_retries=ray_config.max_retries,
        )(ShardScoringActor)
        threads = max(1, int(ray_config.cpus_per_task))
        actors = [actor_class.remote(config, threads, shard_function) for _ in range(count)]
        queue = deque(shards)
        in_flight: dict[Any, tuple[Any, str]] = {}

        def submit(actor) -> None:
            if queue:
                shard = queue.popleft()
                call = actor.score.options(retry_exceptions=True)  # I/O errors too, up to --max-retries
                in_flight[call.remote(shard)] = (actor, shard)

        for actor in actors:
            for _ in range(TASKS_IN_FLIGHT_PER_ACTOR):
                submit(actor)
        samples = scored = 0
        failures: list[str] = []
        dead: set[Any] = set()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, shard = in_flight.pop(done[0])
            try:
                rows = ray.get(done[0])
            except ray.exceptions.RayError as error:  # retries exhausted: report, keep the others going
                failures.append(f"{shard}: {_describe(ray, error)}")
                if isinstance(error, ray.exceptions.RayActorError):
                    dead.add(actor)  # restarted max_retries times already: give its work to the others
                rows = None
            if rows is not None:
                samples += rows
                scored += 1
                if progress:
                    progress.advance(rows)
                    progress.shard_done(rows)
            survivors = [candidate for candidate in actors if candidate not in dead]
            if survivors:
                submit(actor if actor not in dead else survivors[0])
        failures.extend(f"{shard}: not attempted (every actor failed)" for shard in queue)
        for actor in actors:
            ray.kill(actor)
        return RayResult(samples, scored, count, tuple(failures))
    finally:
        if owns_ray:
            ray.shutdown()
