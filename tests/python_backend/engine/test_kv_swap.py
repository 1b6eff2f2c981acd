"""The host block pool: runs are handed out and merged back without overlap, and a swap round trip
gives back the same K/V in other device blocks."""

from __future__ import annotations

import random

import torch

from python_backend.engine.kv_cache import KVPool
from python_backend.engine.kv_swap import HostRuns, KVSwapper


def test_host_runs_never_overlap_and_merge_back_to_one_run():
    runs, held, rng = HostRuns(100), [], random.Random(0)
    for _ in range(3000):
        if held and rng.random() < 0.5:
            runs.free(held.pop(rng.randrange(len(held))))
        else:
            run = runs.allocate(rng.randint(1, 20))
            if run is not None:
                held.append(run)
        pieces = sorted([(h.start, h.length) for h in held] + list(zip(runs.starts, runs.lengths)))
        pos = 0
        for start, length in pieces:  # held and free runs tile the pool exactly
            assert start == pos
            pos += length
        assert pos == 100 and runs.used == sum(h.length for h in held)
    for h in held:
        runs.free(h)
    assert (runs.starts, runs.lengths, runs.used) == ([0], [100], 0)
    assert runs.allocate(101) is None and not runs.fits(101)


def test_swap_round_trip_restores_the_blocks_and_frees_the_host_run():
    pool = KVPool.allocate(
        num_layers=3,
        num_blocks=12,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    for t in [*pool.k, *pool.v]:
        t.copy_(torch.randn_like(t))
    swapper = KVSwapper(pool, num_host_blocks=8, device=torch.device("cpu"))
    before = [(k[[1, 5, 7]].clone(), v[[1, 5, 7]].clone()) for k, v in zip(pool.k, pool.v)]
    run = swapper.swap_out([1, 5, 7])
    assert swapper.host_blocks_used == 3 and not swapper.can_hold(6) and swapper.can_hold(5)
    for t in [*pool.k, *pool.v]:
        t[[1, 5, 7]] = 0.0  # the device blocks go to someone else
    untouched = [b for b in range(12) if b not in (9, 0, 3)]
    others = pool.storage[:, :, untouched].clone()
    swapper.swap_in(run, [9, 0, 3])
    for (k_ref, v_ref), k, v in zip(before, pool.k, pool.v):
        assert torch.equal(k[[9, 0, 3]], k_ref) and torch.equal(v[[9, 0, 3]], v_ref)
    assert torch.equal(pool.storage[:, :, untouched], others)  # the scatter wrote only its own blocks
    assert swapper.host_blocks_used == 0 and swapper.can_hold(8)
