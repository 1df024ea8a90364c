"""Prompt-prefix caching for DeepSeek-V4's caches (CPU bookkeeping, no torch).

Resuming a sequence at token position P needs two things. Its compressed rows and indexer keys
before P live in paged blocks, which other sequences can share by reference. Its slot's state
at P (the sliding-window ring and the compressors' open windows, `kv_cache.py`) is overwritten
by the tokens after P, so it has to be copied out when a sequence has computed exactly P tokens.
A cached prefix is therefore a block-aligned P, the blocks before it and a *snapshot*: a slot
holding a copy of that state. The step whose chunk crosses P writes it (`LLMEngine.
_take_snapshots`): the snapshot slot takes a copy of the sequence's slot before the step, and
the step's ring writes add the chunk's rows up to P there too (`SeqChunk.snapshots`); a later
prompt that starts with those P tokens (and goes on past them) copies the snapshot into its
own slot, takes the blocks and starts computing at P.

A snapshot at every boundary would cost about forty blocks' memory each (Flash: 17 MiB a slot,
0.44 MiB a block), so a prompt is cached at its last block boundary (a repeated prompt, or a
conversation's next turn, whose prompt starts with the previous one, resumes there) and at the
longest boundary up to which an earlier prompt was the same: prompts that share a system
prompt and go different ways meet from the third on (the second takes the snapshot). Prefixes
are named by a SHA-256 chain over their blocks' token ids; the cache remembers the names it
was asked about lately, and drops its least recently used entry when blocks or slots run
short.

Generated text is cached too: a running sequence keeps one entry at the last boundary its
tokens crossed, so a conversation's next turn, whose prompt holds the previous answer, resumes
near its end. That snapshot is taken when the step's tokens reach the host, a step or two after
the crossing, which is exact because the rings keep `margin` positions beyond what a position
needs (`kv_cache.py`): the state at a boundary P is intact in the slot until P + margin.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .block_manager import BlockManager

__all__ = ["CachedPrefix", "PrefixCache", "prefix_hashes"]


def prefix_hashes(tokens: list[int], block_size: int, num_blocks: int, start: int = 0,
                  name: bytes = b"") -> list[bytes]:
    """h[j - start]: the name of tokens[:(j + 1) * block_size] for j in [start, num_blocks),
    chained block by block from `name`, the name of the first `start` blocks."""
    out = []
    for j in range(start, num_blocks):
        block = tokens[j * block_size:(j + 1) * block_size]
        name = hashlib.sha256(name + array("q", block).tobytes()).digest()
        out.append(name)
    return out


@dataclass
class CachedPrefix:
    num_tokens: int  # P, a multiple of the block size
    blocks: list[int]  # the P / block_size blocks before P
    slot: int  # the snapshot of a slot at P


class PrefixCache:
    """Cached prefixes by name, least recently used first; holds a reference to each entry's
    blocks and owns its snapshot slot. At most `max_entries` entries."""

    def __init__(self, block_manager: BlockManager, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.bm, self.max_entries = block_manager, max_entries
        self.block_size = block_manager.block_size
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()
        # names of prefixes looked up lately, cached or not (`lookup`'s shared boundary)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.max_seen = 1 << 16
        block_manager.reclaim = self.evict_one
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of which found cached

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, names: list[bytes]) -> tuple[CachedPrefix | None, int | None]:
        """The longest cached prefix among a prompt's prefix names (`prefix_hashes`), marked as
        used; and the most blocks, beyond that prefix's, up to which an earlier prompt looked
        up was the same (a boundary worth a snapshot: a shared system prompt), or None. Notes
        these names as seen."""
        hit, shared = None, None
        for j in range(len(names), 0, -1):
            entry = self._entries.get(names[j - 1])
            if entry is not None:
                self._entries.move_to_end(names[j - 1])
                hit = entry
                break
            if shared is None and names[j - 1] in self._seen:
                shared = j
        for name in names:
            self._seen[name] = None
            self._seen.move_to_end(name)
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        return hit, shared

    def insert(self, name: bytes, blocks: list[int], slot: int) -> int | None:
        """Cache the prefix `name` made of `blocks`, whose state is in `slot` now: returns the
        slot to copy that state into (the caller copies it before the slot changes), or None
        when the prefix is cached already or no slot can be had."""
        if name in self._entries:
            self._entries.move_to_end(name)
            return None
        while len(self._entries) >= self.max_entries:
            self.evict_one()
        snapshot = self.bm.take_slot()
        if snapshot is None and self.evict_one():
            snapshot = self.bm.take_slot()
        if snapshot is None:
            return None
        self.bm.hold(blocks)
        self._entries[name] = CachedPrefix(len(blocks) * self.block_size, list(blocks), snapshot)
        return snapshot

    def remove(self, name: bytes) -> None:
        """Drop the entry of this name, if cached."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.bm.release(entry.blocks)
            self.bm.give_slot(entry.slot)

    def evict_one(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        self.bm.release(entry.blocks)
        self.bm.give_slot(entry.slot)
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
