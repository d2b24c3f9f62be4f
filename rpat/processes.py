"""How one training job is split into processes: each process's place (:class:`World`, from the environment
torchrun, ``rpat train --processes`` or srun gives it), the rows of a batch each takes, the checks of a split
before any work, and what a job of several processes asks a scheduler for. Free of torch, so planning a
workflow does not import it; the collectives themselves are in rpat/distributed.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from rpat.errors import UserError

# Set by rpat's srun launch: the tasks of this Slurm step are the ranks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
SLURM_RANKS = "RPAT_SLURM_RANKS"


class DistributedSetupError(UserError):
    """A distributed run cannot start as configured (processes vs batch size, a missing rendezvous)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes results, checkpoints, progress and MLflow."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """RANK/WORLD_SIZE/LOCAL_RANK (torchrun, rpat's local launch), or the Slurm task ids under rpat's srun launch;
    else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    if env.get(SLURM_RANKS) == "1":
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``size`` takes (contiguous, sizes differing by at most 1)."""
    return rank * n // size, (rank + 1) * n // size


def resource_problems(resources: Mapping, batch_size: int) -> list[str]:
    """What is wrong with a cell's ``resources.processes`` / ``nodes`` for its batch size (config load time)."""
    n, nodes, gpu = resources["processes"], resources["nodes"], resources["gpu"]
    found = []
    if n % nodes:
        found.append(f"resources.processes={n} is not a multiple of resources.nodes={nodes}: every machine runs the "
                     "same number of processes")
    if n > 1 and gpu > 1:
        found.append(f"resources.gpu={gpu} with resources.processes={n}: a process trains on one GPU; set gpu: 1 "
                     f"and processes to the number of GPUs")
    try:
        check_split(n, batch_size, batch_size)
    except DistributedSetupError as e:
        found.append(str(e))
    return found


def check_split(world_size: int, batch_size: int, examples: int) -> None:
    """Refuse a split that would leave a rank without rows or make shares unequal (before any training);
    ``examples``: training examples per epoch."""
    last = examples % batch_size
    if world_size <= 1:
        return
    if world_size > batch_size:
        raise DistributedSetupError(
            f"resources.processes={world_size} exceeds data.batch_size={batch_size}: every process needs examples "
            f"of every batch; lower resources.processes or raise data.batch_size")
    if batch_size % world_size:
        raise DistributedSetupError(
            f"data.batch_size={batch_size} is not divisible by resources.processes={world_size}: the global batch is "
            f"split evenly over the processes; choose a number of processes that divides {batch_size}")
    if 0 < last < world_size:
        raise DistributedSetupError(
            f"the last batch of each epoch holds {last} of {examples} training examples, fewer than the "
            f"{world_size} processes; change data.train_subset (or data.val_size) so that {examples} % "
            f"{batch_size} is 0 or at least {world_size}")


def job_request(resources: Mapping) -> dict:
    """What one training job asks the workflow's scheduler for, from a cell's ``resources``: Snakemake's threads
    (the CPUs of one machine) and resources. One process: exactly what every other job asks for. Several: one
    Slurm task per process (``mpi`` makes the Slurm executor run the job's command in the batch step, where
    ``rpat train`` starts the ranks with srun), ``gpu`` GPUs each, ``cpus`` CPUs each. A None is left unset."""
    n, nodes, gpu, cpus = (int(resources[k]) for k in ("processes", "nodes", "gpu", "cpus"))
    several = n > 1
    return {"threads": cpus * -(-n // nodes), "gpu": gpu * n,
            "tasks": n if several else None, "nodes": nodes if nodes > 1 else None,
            "mpi": "srun" if several else None, "tasks_per_gpu": 1 if several and gpu else None,
            "cpus_per_task": cpus if several else None}
