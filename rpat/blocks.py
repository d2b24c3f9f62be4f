"""Fixed blocks of evaluated examples, each with randomness of its own.

Evaluation cuts its examples into consecutive blocks of ``eval.block_size``; everything random a measurement
does on a block (PGD's random start, uniform noise) is drawn from a generator seeded by the cell's seed, the
measurement's key and the block's index alone. So per-example outcomes do not depend on how the examples are
sharded over jobs, where a job was interrupted and resumed, or the batch size a GPU could afford.

Shard ``i`` of ``N`` evaluates blocks ``i, i + N, i + 2N, ...`` (round-robin, so the shards' loads stay within
one block of each other whatever the block count).
"""

from __future__ import annotations

import hashlib

import torch


def block_ranges(n: int, block_size: int) -> list[range]:
    """``[range(0, b), range(b, 2b), ...]`` covering ``n`` examples."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, not {block_size}")
    return [range(start, min(n, start + block_size)) for start in range(0, n, block_size)]


def block_seed(seed: int, key: str, block: int) -> int:
    """A 63-bit seed from (cell seed, measurement key, block index); stable across runs and machines."""
    digest = hashlib.sha256(f"rpat-block/{seed}/{key}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_generator(seed: int, key: str, block: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator a measurement draws from on one block (on ``device``, where its random tensors live)."""
    return torch.Generator(device=device).manual_seed(block_seed(seed, key, block))


def shard_blocks(n_blocks: int, shards: int, shard: int) -> list[int]:
    """The blocks shard ``shard`` (0-based) of ``shards`` evaluates: ``shard, shard + shards, ...``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    return list(range(shard, n_blocks, shards))
