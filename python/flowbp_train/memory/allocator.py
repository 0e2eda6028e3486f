"""A model of PyTorch's CUDA caching allocator, replaying an allocation trace to estimate reserved memory.

The rules are those of ``DeviceCachingAllocator`` in PyTorch's c10/cuda/CUDACachingAllocator.cpp with the
default configuration (no ``max_split_size_mb``, no ``roundup_power2_divisions``, no expandable segments,
one stream): ``round_size`` (every request up to a multiple of 512 bytes), ``get_pool`` (requests of at
most 1 MiB go to the small pool, the rest to the large pool), ``get_allocation_size`` (a new small segment
is 2 MiB; a large request below 10 MiB gets a 20 MiB segment, a larger one its size rounded up to 2 MiB),
``get_free_block`` (best fit: the smallest free block that is large enough, lowest address first),
``should_split`` (a small-pool block is split when at least 512 bytes remain, a large-pool block when more
than 1 MiB remains), ``free_block`` / ``try_merge_blocks`` (a freed block merges with its free neighbours
of the same segment) and, when a segment cannot be had under the memory limit, the release of every
cached segment that holds no allocation before retrying (``release_cached_blocks``). This file is our own
model of those rules, not a copy. Fixed costs outside the allocator are named constants below.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

KiB, MiB, GiB = 1024, 1024**2, 1024**3
MIN_BLOCK = 512  # kMinBlockSize: every size is rounded up to this
SMALL_SIZE = 1 * MiB  # kSmallSize: the largest request served by the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: the segment size of the small pool
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: large requests below this share a 20 MiB segment
LARGE_BUFFER = 20 * MiB  # kLargeBuffer
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get their size rounded up to this

# ----------------------------------------------------------------------------------- fixed costs
#: CUDA context and the loaded kernels of torch on a Hopper/Ampere GPU: 0.5-1 GiB (lazy module loading
#: keeps it near the low end); we count the middle of that range.
CUDA_CONTEXT_BYTES = 768 * MiB
#: cuBLAS workspace: torch's default ``CUBLAS_WORKSPACE_CONFIG`` on Hopper is ``:4096:8`` plus a larger
#: one for cuBLASLt, about 32 MiB per stream and handle; one stream, two handles.
CUBLAS_WORKSPACE_BYTES = 64 * MiB
#: cuDNN convolution workspace (VAE and reward convolutions): cuDNN picks algorithms by speed within free
#: memory, up to about 1 GiB for a 1024-px VAE decoder layer; we count a typical 256 MiB and say so.
CUDNN_WORKSPACE_BYTES = 256 * MiB
#: NCCL buffers per rank in a multi-GPU run: 8 channels x 2 buffers x 4 MiB (``NCCL_BUFFSIZE``) per peer
#: connection type, about 0.2-0.5 GiB; counted only when world_size > 1.
NCCL_BYTES_PER_RANK = 384 * MiB


def round_size(size: int) -> int:
    """``round_size``: at least 512 bytes, a multiple of 512."""
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment a request that finds no free block makes the allocator reserve."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


def fixed_costs(world_size: int = 1) -> dict[str, int]:
    """The device memory outside the allocator's pools, by name (bytes)."""
    costs = {"CUDA context": CUDA_CONTEXT_BYTES, "cuBLAS workspace": CUBLAS_WORKSPACE_BYTES,
             "cuDNN workspace": CUDNN_WORKSPACE_BYTES}
    if world_size > 1:
        costs["NCCL buffers"] = NCCL_BYTES_PER_RANK
    return costs


class _Block:
    __slots__ = ("addr", "size", "seg", "allocated", "prev", "next", "small")

    def __init__(self, addr: int, size: int, seg: int, small: bool):
        self.addr, self.size, self.seg, self.small = addr, size, seg, small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class OutOfMemory(RuntimeError):
    """The replay could not reserve a segment under the memory limit, even after emptying the cache."""


@dataclass
class ReplayResult:
    """Peaks of a replay. ``peak_allocated``: bytes in allocated blocks (a block keeps a whole segment when
    the rest is too small to split off); ``peak_reserved``: bytes in segments; ``reserved_at_end``;
    ``num_segments`` at the reserved peak; ``oom_at``: the event index of an OOM (None: none)."""

    peak_allocated: int
    peak_reserved: int
    peak_reserved_event: int
    reserved_at_end: int
    num_segments: int
    oom_at: int | None = None


class CachingAllocator:
    """The block pools of one device and one stream; ``malloc(size) -> block id`` and ``free(block id)``.

    ``limit``: device bytes the allocator may reserve (None: unlimited). Over the limit it first releases
    all cached segments with no allocation in them, then raises :class:`OutOfMemory`.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.pools: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # sorted (size, addr)
        self.segments: dict[int, int] = {}  # segment id -> size
        self.reserved = 0
        self.allocated = 0
        self._next_addr = 0
        self._next_seg = 0

    def _insert(self, b: _Block) -> None:
        bisect.insort(self.pools[b.small], (b.size, b.addr, b))

    def _remove(self, b: _Block) -> None:
        pool = self.pools[b.small]
        i = bisect.bisect_left(pool, (b.size, b.addr))
        while pool[i][2] is not b:
            i += 1
        del pool[i]

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_size = allocation_size(size)
        if self.limit is not None and self.reserved + seg_size > self.limit:
            self.release_cached()
            if self.reserved + seg_size > self.limit:
                raise OutOfMemory(f"cannot reserve {seg_size} bytes ({self.reserved} reserved, limit {self.limit})")
        seg = self._next_seg
        self._next_seg += 1
        # segments never share addresses; a gap keeps blocks of different segments from looking adjacent
        b = _Block(self._next_addr, seg_size, seg, small)
        self._next_addr += seg_size + ROUND_LARGE
        self.segments[seg] = seg_size
        self.reserved += seg_size
        return b

    def release_cached(self) -> None:
        """Free every segment that is one whole free block (``release_cached_blocks``)."""
        for small in (True, False):
            keep = []
            for entry in self.pools[small]:
                b = entry[2]
                if b.prev is None and b.next is None:
                    self.reserved -= self.segments.pop(b.seg)
                else:
                    keep.append(entry)
            self.pools[small] = keep

    def malloc(self, size: int) -> _Block:
        size = round_size(size)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            b = pool.pop(i)[2]
        else:
            b = self._new_segment(size, small)
        remaining = b.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(b.addr + size, remaining, b.seg, small)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = size
            self._insert(rest)
        b.allocated = True
        self.allocated += b.size
        return b

    def free(self, b: _Block) -> None:
        b.allocated = False
        self.allocated -= b.size
        for nb in (b.prev, b.next):
            if nb is not None and not nb.allocated:
                self._remove(nb)
                if nb is b.prev:
                    b.addr = nb.addr
                    b.prev = nb.prev
                    if nb.prev is not None:
                        nb.prev.next = b
                else:
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
                b.size += nb.size
        self._insert(b)


def replay(events: Iterable[tuple[int, int, int]], *, limit: int | None = None) -> ReplayResult:
    """Replay ``(kind, alloc_id, size)`` events (kind 0 allocate, 1 free, 2 release the cached segments) through
    :class:`CachingAllocator`."""
    alloc = CachingAllocator(limit)
    blocks: dict[int, _Block] = {}
    peak_alloc = peak_res = 0
    peak_event = -1
    segs = 0
    for n, (kind, aid, size) in enumerate(events):
        if kind == 0:
            try:
                blocks[aid] = alloc.malloc(size)
            except OutOfMemory:
                return ReplayResult(peak_alloc, max(peak_res, alloc.reserved), peak_event, alloc.reserved,
                                    len(alloc.segments), oom_at=n)
            peak_alloc = max(peak_alloc, alloc.allocated)
            if alloc.reserved > peak_res:
                peak_res, peak_event, segs = alloc.reserved, n, len(alloc.segments)
        elif kind == 2:  # torch.cuda.empty_cache(): every cached segment that holds no allocation
            alloc.release_cached()
        else:
            b = blocks.pop(aid, None)
            if b is not None:
                alloc.free(b)
    return ReplayResult(peak_alloc, peak_res, peak_event, alloc.reserved, segs)
