"""Starting one training job as N processes (``rpat train --processes N``), and ending it as one job.

On one machine the ranks are child processes of this one (rendezvous on a free local port). Inside a Slurm
batch allocation with as many tasks (``resources.processes`` > 1 asks the workflow's Slurm jobs for them), or
across nodes, they are one ``srun`` step's tasks, each reading its rank from Slurm (rpat/distributed.py).

Whatever launches them, the job's exit code is the ranks' together: 0 when every rank finished, 75 when they
stopped on a signal after saving one state (rerun to resume), else the first failing rank's code, after the
other ranks were stopped: a rank that dies leaves the others waiting in a collective forever.
SIGTERM, SIGUSR1 and SIGINT reaching this process are passed on to every rank.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from rpat.processes import SLURM_RANKS
from rpat.preemption import Preempted

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
KILL_GRACE_S = 10.0
USER_ERROR = 2  # `rpat`'s exit code for a bad input (the error line says which)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_slurm_batch(processes: int, env=os.environ) -> bool:
    """This process runs in a Slurm job's batch step that holds at least ``processes`` tasks (not inside an
    ``srun`` step, where a nested step would compete for the same CPUs and GPUs)."""
    return ("SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env
            and int(env.get("SLURM_NTASKS", "1")) >= processes)


def launch(worker_args: list[str], processes: int, nodes: int = 1, threads: int | None = None) -> int:
    """Run ``python -m rpat <worker_args>`` as ``processes`` ranks over ``nodes`` machines; the job's exit code.
    ``threads``: CPU threads of the whole job (default: this machine's CPUs), shared evenly by the ranks of a
    machine, so that N ranks do not each start a thread per core."""
    per_node = -(-processes // nodes)
    threads = threads or len(os.sched_getaffinity(0))
    per_rank = max(1, threads // per_node)
    args = [*worker_args, "--threads", str(per_rank)]
    if nodes > 1 or in_slurm_batch(processes):
        return _srun(args, processes, nodes, per_rank)
    return _local(args, processes)


def _local(args: list[str], processes: int) -> int:
    port = str(free_port())
    procs = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "rpat", *args], env=env))
    return supervise(procs)


def _first_host(env=os.environ) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return socket.gethostname()
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _srun(args: list[str], processes: int, nodes: int, per_rank: int) -> int:
    env = {**os.environ, SLURM_RANKS: "1", "MASTER_ADDR": _first_host(),
           "MASTER_PORT": str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)}
    cmd = ["srun", f"--ntasks={processes}", f"--nodes={nodes}", "--kill-on-bad-exit=1", "--export=ALL",
           f"--cpus-per-task={per_rank}"]
    return supervise([subprocess.Popen([*cmd, sys.executable, "-m", "rpat", *args], env=env)])


def supervise(procs: list[subprocess.Popen]) -> int:
    """Wait for every process, forwarding signals; stop the rest when one fails; the job's exit code."""
    previous = {sig: signal.signal(sig, lambda s, f: _forward(procs, s)) for sig in FORWARDED}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, Preempted.exit_code)]
            if failed:
                rank, code = failed[0]
                if code == USER_ERROR and _all_said(procs):
                    return code
                _stop(procs)
                print(f"rpat train: error: rank {rank} of {len(procs)} {_describe(code)}; stopped the other ranks. "
                      "Its output is above; the last saved state is kept: fix the cause and rerun to resume",
                      file=sys.stderr)
                return code if code > 0 else 1
            if all(c is not None for c in codes):
                return Preempted.exit_code if Preempted.exit_code in codes else 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _all_said(procs: list[subprocess.Popen], wait_s: float = 10.0) -> bool:
    """Every rank stopped on the same bad input (they check it alike), which rank 0 has explained."""
    try:
        for p in procs:
            p.wait(wait_s)
    except subprocess.TimeoutExpired:
        return False
    return all(p.returncode == USER_ERROR for p in procs)


def _forward(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill the ranks still running: they wait on the failed one in a collective and cannot save a state."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    deadline = time.time() + KILL_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
