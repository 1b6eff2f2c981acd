"""Moving a paused sequence's KV cache between the device pool and host memory.

A swapped-out sequence keeps its K/V in one host buffer per sequence ([layers, 2, blocks, block_size,
kv_heads, head_dim], pinned on a GPU so copies are asynchronous); the host pool's capacity is counted
in blocks. On a GPU the copies run on a side stream: `fence()` makes the compute stream wait for the
swaps this step's batch depends on (swap-ins of its sequences, and swap-outs whose device blocks were
handed to it), while proactive swap-ins issued after the fence overlap with the forward pass. On a CPU
the copies are plain and immediate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from python_backend.engine.kv_cache import KVPool


@dataclass
class SwapStats:
    swap_outs: int = 0
    swap_ins: int = 0
    blocks_out: int = 0
    blocks_in: int = 0


class KVSwapper:
    def __init__(self, pool: KVPool, num_host_blocks: int, device: torch.device):
        self.pool = pool
        self.num_host_blocks = num_host_blocks
        self.host_blocks_used = 0
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = SwapStats()
        self._keep: list[tuple[object, object]] = []  # (event, buffer) alive until the copy is done

    def can_hold(self, num_blocks: int) -> bool:
        return self.host_blocks_used + num_blocks <= self.num_host_blocks

    def _buffer(self, n: int) -> torch.Tensor:
        k0 = self.pool.k[0]
        shape = (len(self.pool.k), 2, n, *k0.shape[1:])
        return torch.empty(shape, dtype=k0.dtype, pin_memory=self.cuda)

    def _side_index(self, blocks: list[int]) -> torch.Tensor:
        """The block ids on the device, copied on the side stream from pinned memory (call inside it).
        Made with torch.tensor(..., device=...) on the compute stream instead, the copy waited for
        the step in flight: every swap stalled the host for a whole step (H100, 1,024 blocks: 5,272
        swaps made MLFQ's run 107 s against FCFS's 17 s)."""
        host = torch.tensor(blocks, dtype=torch.long).pin_memory()
        idx = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._keep.append((event, host))  # the pinned ids must outlive their copy
        return idx

    def swap_out(self, blocks: list[int]) -> torch.Tensor:
        """Copy these device blocks to a new host buffer; the blocks may be reused once fence() has run."""
        buf = self._buffer(len(blocks))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the last step wrote them
            with torch.cuda.stream(self.stream):
                idx = self._side_index(blocks)
                for i, (k, v) in enumerate(zip(self.pool.k, self.pool.v)):
                    buf[i, 0].copy_(k.index_select(0, idx), non_blocking=True)
                    buf[i, 1].copy_(v.index_select(0, idx), non_blocking=True)
        else:
            idx = torch.tensor(blocks, dtype=torch.long)
            for i, (k, v) in enumerate(zip(self.pool.k, self.pool.v)):
                torch.index_select(k, 0, idx, out=buf[i, 0])
                torch.index_select(v, 0, idx, out=buf[i, 1])
        self.host_blocks_used += len(blocks)
        self.stats.swap_outs += 1
        self.stats.blocks_out += len(blocks)
        return buf

    def swap_in(self, buf: torch.Tensor, blocks: list[int]) -> None:
        """Copy a host buffer into these (newly allocated) device blocks and give back its host blocks."""
        if self.cuda:
            with torch.cuda.stream(self.stream):
                idx = self._side_index(blocks)
                for i, (k, v) in enumerate(zip(self.pool.k, self.pool.v)):
                    k.index_copy_(0, idx, buf[i, 0].to(self.device, non_blocking=True))
                    v.index_copy_(0, idx, buf[i, 1].to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.stream)
            self._keep.append((event, buf))  # the host buffer must outlive its copy
        else:
            idx = torch.tensor(blocks, dtype=torch.long)
            for i, (k, v) in enumerate(zip(self.pool.k, self.pool.v)):
                k.index_copy_(0, idx, buf[i, 0])
                v.index_copy_(0, idx, buf[i, 1])
        self.host_blocks_used -= len(blocks)
        self.stats.swap_ins += 1
        self.stats.blocks_in += len(blocks)

    def drop(self, num_blocks: int) -> None:
        """A swapped-out sequence ended (finished or cancelled): its host blocks are free."""
        self.host_blocks_used -= num_blocks

    def fence(self) -> None:
        """The compute stream waits for every swap issued so far."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._keep = [(e, b) for e, b in self._keep if not e.query()]
