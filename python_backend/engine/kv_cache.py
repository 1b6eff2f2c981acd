"""The paged KV cache: one preallocated pool of fixed-size blocks per layer, and the block manager
that hands blocks to sequences, counts references, and shares full prompt blocks between requests
(prefix caching: a full block is keyed by a hash of its tokens and of the blocks before it)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# A quantized KV cache stores each token's head vector as head_dim codes and a float16 scale: int8 codes
# in an int8 pool, E4M3 codes in a uint8 pool (index operations are defined for every integer type on
# every device). The pool keeps the shape [..., block_size, num_kv_heads, head_dim + 2], its bytes, but
# a block holds all its codes first and then all its scales (`code_views`), so every token's codes
# start on a multiple of head_dim bytes and the GPU reads them in wide vector loads. kv_swap.py moves
# whole blocks without knowing.
KV_CODE_DTYPES = {"int8": torch.int8, "fp8": torch.uint8}
SCALE_BYTES = 2


def pool_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    return KV_CODE_DTYPES.get(kv_cache_dtype, dtype)


def row_width(kv_cache_dtype: str, head_dim: int) -> int:
    return head_dim + SCALE_BYTES if kv_cache_dtype in KV_CODE_DTYPES else head_dim


def code_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized layer cache [N, block_size, Hkv, head_dim + 2] as its codes [N, block_size, Hkv,
    head_dim] and its scales' bytes [N, block_size, Hkv, 2], views into each block's two regions."""
    n, bs, hkv, width = cache.shape
    d = width - SCALE_BYTES
    flat = cache.view(n, bs * hkv * width)
    return flat[:, : bs * hkv * d].view(n, bs, hkv, d), flat[:, bs * hkv * d :].view(n, bs, hkv, SCALE_BYTES)


@dataclass
class KVPool:
    """K and V storage: per layer a tensor [num_blocks, block_size, num_kv_heads, head_dim], all of them
    views of one tensor `storage` [num_layers, 2, num_blocks, ...], so that moving a sequence's blocks to
    or from host memory is one gather or scatter for every layer at once (kv_swap.py), not one per
    layer and per K and V (with 16 layers, 64 small copies a swap)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    storage: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
    ) -> KVPool:
        """`kv_cache_dtype` int8 or fp8 stores codes and scales (above); auto stores `dtype`."""
        width = row_width(kv_cache_dtype, head_dim)
        storage = torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, width),
            dtype=pool_dtype(kv_cache_dtype, dtype),
            device=device,
        )
        return cls(
            [storage[i, 0] for i in range(num_layers)], [storage[i, 1] for i in range(num_layers)], block_size, storage
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
    ) -> int:
        width = row_width(kv_cache_dtype, head_dim)
        item = torch.tensor([], dtype=pool_dtype(kv_cache_dtype, dtype)).element_size()
        return 2 * num_layers * block_size * num_kv_heads * width * item


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    """Block allocation with reference counts and a prefix cache.

    A block whose count drops to zero keeps its contents: if it was registered under a hash it stays
    findable (least recently freed is reused first), so a later request with the same prefix skips its
    prefill. `num_free` counts both never-used and reusable blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used or unhashed blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # count 0 but holding a cached prefix
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        # what a registered block holds: the chain hash of the blocks before it and its own tokens. A
        # hit must match both, so that two prefixes whose hashes collide never share a block
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash.pop(block)]
            del self._block_key[block]
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} KV blocks, {self.num_free} free")
        return [self._take() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # the tail first, so a shared head stays cached longest
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    @staticmethod
    def chain_hash(parent: int, tokens) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """Blocks already holding the longest cached prefix of `token_ids` (at most `max_tokens` tokens),
        with their reference counts taken; and the chain hashes of those blocks."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes, parent = [], [], 0
        bs = self.block_size
        for i in range(max_tokens // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(parent, tokens)
            block = self._hash_to_block.get(h)
            if block is None or self._block_key[block] != (parent, tokens):
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            if self.ref_counts[block] == 0:
                self._evictable.pop(block, None)
            self.ref_counts[block] += 1
        return blocks, hashes

    def register(self, block: int, h: int, tokens, parent: int) -> None:
        """Make a full, computed block findable by the hash of its prefix; `parent` is the chain hash of
        the blocks before it (0 for the first block)."""
        if not self.enable_prefix_caching or block in self._block_hash or h in self._hash_to_block:
            return
        self._hash_to_block[h] = block
        self._block_hash[block] = h
        self._block_key[block] = (parent, tuple(tokens))

    def reset_prefix_cache(self) -> None:
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hash.clear()
        self._block_key.clear()
