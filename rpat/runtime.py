"""Process-level setup shared by every job: device, threads, seeds and RNG states."""

from __future__ import annotations

import random

import torch

from rpat.errors import DeviceUnavailable


def select_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, raised before any work."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("train.device is 'cuda' but no CUDA GPU is visible to this process; "
                           "set train.device: auto (or cpu), or run the job on a GPU node")
    return torch.device(requested)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """The process's RNG states; ``cuda_device``: that of the GPU the job computes on, which is what a rank of a
    distributed job (each on its own GPU, all in the same state) restores on whichever GPU it gets."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
        if "cuda_device" in state and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_device"], device)
