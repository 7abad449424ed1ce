"""Paged KV cache bookkeeping for autoregressive decoders, after vLLM's block manager.

Pure data structures, no tensors: a fixed number of blocks of ``block_size``
token slots (from a byte cap), per-sequence block tables, append-only growth,
reference counts, prefix sharing (full blocks are identified by a hash chain
of their contents, so sequences with the same prefix, e.g. several questions
about one image, share its blocks), copy-on-write when a shared partial block
is appended to, and LRU eviction of unreferenced cached blocks.  The engine
moves tensors according to the block ids and copy operations returned here.

:class:`PagedKVStore` puts arrays in those blocks for the common case of a
fixed-length prefix shared by content (an image's cross-attention keys and
values, computed once however many questions or sessions ask about it).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

__all__ = ["KVCacheConfig", "BlockPool", "OutOfBlocks", "CopyOp", "PagedKVStore"]


class OutOfBlocks(RuntimeError):
    """Not enough free or evictable blocks (the caller waits or answers busy)."""


@dataclass(frozen=True)
class KVCacheConfig:
    block_size: int  # token slots per block
    num_blocks: int  # blocks in the pool

    @classmethod
    def from_bytes(cls, cap_bytes: int, block_size: int, bytes_per_token: int) -> KVCacheConfig:
        """As many blocks as ``cap_bytes`` holds (keys and values of every layer per token)."""
        num = cap_bytes // (block_size * bytes_per_token)
        if num < 1:
            raise ValueError(f"{cap_bytes} bytes cannot hold one block of {block_size} tokens")
        return cls(block_size, num)


@dataclass(frozen=True)
class CopyOp:
    src: int  # block to copy from (shared)
    dst: int  # private block that replaces it in the sequence


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hash of each full block's chain


class BlockPool:
    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.free: collections.deque[int] = collections.deque(range(config.num_blocks))
        self.refs = [0] * config.num_blocks
        self.block_hash: dict[int, int] = {}  # full block id -> content hash
        self.by_hash: dict[int, int] = {}  # content hash -> block id
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self.seqs: dict[Hashable, _Seq] = {}

    # -- internals ---------------------------------------------------------------

    def _take(self) -> int:
        if self.free:
            return self.free.popleft()
        if self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.by_hash[self.block_hash.pop(block)]
            return block
        raise OutOfBlocks(
            f"KV cache is full: {self.config.num_blocks} blocks of {self.config.block_size} "
            "tokens are all in use"
        )

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.block_hash:
                self.evictable[block] = None  # keep its contents for a later prefix hit
            else:
                self.free.append(block)

    def _seal(self, seq: _Seq, index: int, salt: Hashable) -> None:
        """Block ``index`` of ``seq`` just became full: register its content hash."""
        size = self.config.block_size
        parent = seq.hashes[index - 1] if index else hash(("salt", salt))
        h = hash((parent, tuple(seq.tokens[index * size : (index + 1) * size])))
        seq.hashes.append(h)
        block = seq.blocks[index]
        if h not in self.by_hash and block not in self.block_hash:
            self.by_hash[h] = block
            self.block_hash[block] = h

    # -- API ----------------------------------------------------------------------

    def cached_blocks(self, tokens: Sequence[int], salt: Hashable = None) -> int:
        """How many leading full blocks of ``tokens`` (under ``salt``) are cached now,
        i.e. what :meth:`allocate` would share instead of filling."""
        size = self.config.block_size
        parent = hash(("salt", salt))
        count = 0
        for start in range(0, len(tokens) - len(tokens) % size, size):
            h = hash((parent, tuple(tokens[start : start + size])))
            if h not in self.by_hash:
                break
            parent = h
            count += 1
        return count

    def allocate(self, seq_id: Hashable, tokens: Sequence[int], salt: Hashable = None) -> list[int]:
        """Blocks for a new sequence's prompt; full blocks already cached are shared.

        ``salt`` separates prefixes with equal token ids but different content
        (e.g. two images' keys and values).  Returns the block table.
        """
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        size = self.config.block_size
        seq = _Seq()
        parent = hash(("salt", salt))
        reused = 0
        for start in range(0, len(tokens) - len(tokens) % size, size):  # full blocks
            h = hash((parent, tuple(tokens[start : start + size])))
            if h not in self.by_hash:
                break
            block = self.by_hash[h]
            self._ref(block)
            seq.blocks.append(block)
            seq.hashes.append(h)
            parent = h
            reused += 1
        seq.tokens = list(tokens[: reused * size])
        self.seqs[seq_id] = seq
        try:
            self.append(seq_id, tokens[reused * size :], salt)
        except OutOfBlocks:
            self.free_seq(seq_id)
            raise
        return list(seq.blocks)

    def append(
        self, seq_id: Hashable, tokens: Sequence[int], salt: Hashable = None
    ) -> list[CopyOp]:
        """Append tokens; returns copy-on-write operations the caller must perform."""
        seq = self.seqs[seq_id]
        size = self.config.block_size
        copies: list[CopyOp] = []
        for token in tokens:
            slot = len(seq.tokens) % size
            if slot == 0:
                block = self._take()
                self._ref(block)
                seq.blocks.append(block)
            elif self.refs[seq.blocks[-1]] > 1:  # shared partial block: copy on write
                shared = seq.blocks[-1]
                block = self._take()
                self._ref(block)
                self._unref(shared)
                seq.blocks[-1] = block
                copies.append(CopyOp(shared, block))
            seq.tokens.append(token)
            if len(seq.tokens) % size == 0:
                self._seal(seq, len(seq.blocks) - 1, salt)
        return copies

    def fork(self, src: Hashable, dst: Hashable) -> list[int]:
        """``dst`` shares all of ``src``'s blocks (e.g. a second answer to one prompt)."""
        if dst in self.seqs:
            raise ValueError(f"sequence {dst!r} already exists")
        seq = self.seqs[src]
        for block in seq.blocks:
            self._ref(block)
        self.seqs[dst] = _Seq(list(seq.blocks), list(seq.tokens), list(seq.hashes))
        return list(seq.blocks)

    def free_seq(self, seq_id: Hashable) -> None:
        seq = self.seqs.pop(seq_id)
        for block in reversed(seq.blocks):  # tail first: prefixes stay cached longest
            self._unref(block)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self.seqs[seq_id].blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self.seqs[seq_id].tokens)

    def stats(self) -> dict[str, float]:
        """Blocks in use, cached, free, and waste: allocated slots not holding a token."""
        used = {b for s in self.seqs.values() for b in s.blocks}
        tokens = sum(len(s.tokens) for s in self.seqs.values())
        # Shared blocks hold their tokens once: count slots per distinct block.
        filled: dict[int, int] = {}
        size = self.config.block_size
        for s in self.seqs.values():
            for i, b in enumerate(s.blocks):
                filled[b] = max(filled.get(b, 0), min(size, len(s.tokens) - i * size))
        slots = len(used) * size
        waste = slots - sum(filled.values())
        return {
            "blocks_used": len(used),
            "blocks_cached": len(self.evictable),
            "blocks_free": len(self.free),
            "tokens": tokens,
            "waste_slots": waste,
            "waste_fraction": waste / slots if slots else 0.0,
        }


def _block_size(tokens: int, limit: int = 32) -> int:
    """The largest divisor of ``tokens`` up to ``limit``: an entry fills whole
    blocks, so every block of a cached entry can be shared."""
    return max(d for d in range(1, min(tokens, limit) + 1) if tokens % d == 0)


class PagedKVStore:
    """Paged float32 storage of keys/values ``[layers, 2, tokens, d]``, shared by content.

    Thread-safe.  ``acquire(digest, compute)`` returns a handle whose blocks
    hold the entry's keys/values, calling ``compute()`` only when ``digest``
    is not cached (outside the lock, so other threads go on); ``read(handle)``
    gathers them; ``release(handle)`` lets them be evicted (least recently
    used first) when space is needed.  ``acquire`` raises :class:`OutOfBlocks`
    when every block is held.
    """

    def __init__(self, kv_shape: tuple[int, int, int, int], cap_bytes: int) -> None:
        self.layers, two, self.tokens, self.d = kv_shape
        if two != 2:
            raise ValueError(f"kv_shape is [layers, 2, tokens, d], got {list(kv_shape)}")
        size = _block_size(self.tokens)
        per_token = self.layers * 2 * self.d * 4
        self.pool = BlockPool(KVCacheConfig.from_bytes(cap_bytes, size, per_token))
        self.store = np.zeros(
            (self.pool.config.num_blocks, size, self.layers, 2, self.d), np.float32
        )
        self._positions = list(range(self.tokens))
        self._lock = threading.Lock()
        self._ids = 0
        self.hits = 0
        self.misses = 0

    def acquire(self, digest: bytes, compute: Callable[[], Any]) -> int:
        """A handle on entry ``digest``'s keys/values; ``compute() -> [L, 2, T, d]``."""
        with self._lock:
            whole = self.pool.cached_blocks(self._positions, digest) * self.pool.config.block_size
            cached = whole == self.tokens
        kv = None if cached else np.asarray(compute(), np.float32)  # outside the lock
        with self._lock:
            self._ids += 1
            handle = self._ids
            table = self.pool.allocate(handle, self._positions, digest)
            if kv is None:
                self.hits += 1
            else:
                self.misses += 1
                size = self.pool.config.block_size
                rows = kv.transpose(2, 0, 1, 3)  # [T, L, 2, d]
                self.store[table] = rows.reshape(len(table), size, self.layers, 2, self.d)
            return handle

    def read(self, handle: int) -> np.ndarray:
        """The keys/values ``[layers, 2, tokens, d]`` of a held entry."""
        with self._lock:
            table = self.pool.block_table(handle)
            rows = self.store[table].reshape(self.tokens, self.layers, 2, self.d)
        return np.ascontiguousarray(rows.transpose(1, 2, 0, 3))

    def release(self, handle: int) -> None:
        with self._lock:
            self.pool.free_seq(handle)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.pool.stats(), "hits": self.hits, "misses": self.misses}
