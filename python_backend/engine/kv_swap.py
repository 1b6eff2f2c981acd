"""Moving a paused sequence's KV cache between the device pool and host memory.

The host pool is allocated once, [host_blocks, layers, 2, block_size, kv_heads, head_dim] (pinned on a
GPU, so copies are asynchronous), and a swapped-out sequence holds one contiguous run of it. A swap is
then one gather (or scatter) over the device pool's single tensor, every layer at once, and one copy:
three operations with the block ids' copy, where a copy per layer and per K and V would make dozens
(64 for 16 layers) and slow the jobs that are swapped most. The host pool is pinned once because
allocating a pinned buffer per swap (`torch.empty(..., pin_memory=True)`) is slow enough to take a
sizeable share of the host's time when swaps are frequent.

On a GPU the copies run on a side stream: `fence()` makes the compute stream wait for the swaps this
step's batch depends on (swap-ins of its sequences, and swap-outs whose device blocks were handed to
it), while proactive swap-ins issued after the fence overlap with the forward pass. A run of host
blocks that a swap-in read from is reused only once that copy is done. On a CPU the copies are plain
and immediate.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from python_backend.engine.kv_cache import KVPool


@dataclass
class SwapStats:
    swap_outs: int = 0
    swap_ins: int = 0
    blocks_out: int = 0
    blocks_in: int = 0


@dataclass
class HostRun:
    """Where a swapped-out sequence's blocks are: host blocks start .. start + length."""

    start: int
    length: int


class HostRuns:
    """First-fit allocation of contiguous runs of host blocks, merging neighbours when freed."""

    def __init__(self, num_blocks: int):
        self.starts = [0] if num_blocks else []  # free runs, sorted by start
        self.lengths = [num_blocks] if num_blocks else []
        self.used = 0

    def allocate(self, n: int) -> HostRun | None:
        for i, length in enumerate(self.lengths):
            if length >= n:
                start = self.starts[i]
                if length == n:
                    del self.starts[i], self.lengths[i]
                else:
                    self.starts[i] += n
                    self.lengths[i] -= n
                self.used += n
                return HostRun(start, n)
        return None

    def fits(self, n: int) -> bool:
        return any(length >= n for length in self.lengths)

    def free(self, run: HostRun) -> None:
        i = bisect.bisect_left(self.starts, run.start)
        self.starts.insert(i, run.start)
        self.lengths.insert(i, run.length)
        self.used -= run.length
        if i + 1 < len(self.starts) and self.starts[i] + self.lengths[i] == self.starts[i + 1]:
            self.lengths[i] += self.lengths.pop(i + 1)
            self.starts.pop(i + 1)
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] == self.starts[i]:
            self.lengths[i - 1] += self.lengths.pop(i)
            self.starts.pop(i)


class KVSwapper:
    def __init__(self, pool: KVPool, num_host_blocks: int, device: torch.device):
        self.pool = pool
        self.num_host_blocks = num_host_blocks
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = SwapStats()
        layers = pool.storage.shape[0]
        self.by_block = pool.storage.permute(2, 0, 1, 3, 4, 5)  # a view [blocks, layers, 2, ...] of the pool
        self.host = torch.empty(
            (num_host_blocks, layers, *self.by_block.shape[2:]), dtype=pool.storage.dtype, pin_memory=self.cuda
        )
        self.runs = HostRuns(num_host_blocks)
        self._pending: list[tuple[object, HostRun]] = []  # runs freed once the event (their last read) is done
        self._keep: list[tuple[object, object]] = []  # (event, pinned ids) alive until the copy is done

    @property
    def host_blocks_used(self) -> int:
        return self.runs.used  # runs still being read by a swap-in count until they are reclaimed

    def _reclaim(self) -> None:
        still = []
        for event, run in self._pending:
            if event.query():
                self.runs.free(run)
            else:
                still.append((event, run))
        self._pending = still

    def can_hold(self, num_blocks: int) -> bool:
        self._reclaim()
        return self.runs.fits(num_blocks)

    def _side_index(self, blocks: list[int]) -> torch.Tensor:
        """The block ids on the device, copied on the side stream from pinned memory (call inside it).
        Made with torch.tensor(..., device=...) on the compute stream instead, the copy would wait
        for the step in flight: every swap would stall the host for a whole step, and with frequent
        swaps MLFQ would run several times slower than FCFS."""
        host = torch.tensor(blocks, dtype=torch.long).pin_memory()
        idx = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._keep.append((event, host))  # the pinned ids must outlive their copy
        return idx

    def swap_out(self, blocks: list[int]) -> HostRun:
        """Copy these device blocks to a run of host blocks; the device blocks may be reused once
        fence() has run. The caller checked can_hold()."""
        run = self.runs.allocate(len(blocks))
        if run is None:
            raise RuntimeError(f"no run of {len(blocks)} free host blocks (check can_hold first)")
        dst = self.host[run.start : run.start + run.length]
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the last step wrote them
            with torch.cuda.stream(self.stream):
                dst.copy_(self.by_block.index_select(0, self._side_index(blocks)), non_blocking=True)
        else:
            torch.index_select(self.by_block, 0, torch.tensor(blocks, dtype=torch.long), out=dst)
        self.stats.swap_outs += 1
        self.stats.blocks_out += len(blocks)
        return run

    def swap_in(self, run: HostRun, blocks: list[int]) -> None:
        """Copy a run of host blocks into these (newly allocated) device blocks and give the run back."""
        src = self.host[run.start : run.start + run.length]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                idx = self._side_index(blocks)
                self.by_block.index_copy_(0, idx, src.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.stream)
            self._pending.append((event, run))  # reusable once this copy has read it
        else:
            self.by_block.index_copy_(0, torch.tensor(blocks, dtype=torch.long), src)
            self.runs.free(run)
        self.stats.swap_ins += 1
        self.stats.blocks_in += len(blocks)

    def drop(self, run: HostRun) -> None:
        """A swapped-out sequence ended (finished or cancelled): its host blocks are free (once the
        swap-out that wrote them is done: fence() orders it before any later swap-out's copy)."""
        self.runs.free(run)

    def fence(self) -> None:
        """The compute stream waits for every swap issued so far."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._keep = [(e, b) for e, b in self._keep if not e.query()]
        self._reclaim()
