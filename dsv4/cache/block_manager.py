"""Block and slot bookkeeping for the paged compressed KV cache (CPU only, no torch).

DeepSeek-V4's compressed KV cache is paged in blocks of ``block_size`` (128) tokens:
block ``b`` of a sequence holds that sequence's compressed rows for tokens
``[b * block_size, (b + 1) * block_size)`` in every layer. Every running sequence
also holds exactly one *slot*: a row index into per-sequence fixed-size buffers
(sliding-window ring, compressor state).

Blocks are reference-counted: a full block of a cached prompt prefix (`prefix_cache.py`) is
held by the cache and by every sequence that resumed from it, and goes back to the free list
when the last of them lets go. Slots may also be held outside sequences (the prefix cache's
state snapshots). When blocks or slots run short, `reclaim` (set by the prefix cache) is asked
to let go of something before an allocation is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

__all__ = ["BlockManager", "OutOfBlocks", "OutOfSlots"]


class OutOfBlocks(RuntimeError):
    """Not enough free blocks (or slots, see :class:`OutOfSlots`) for an allocation.

    Raised before any state is modified: the manager is unchanged afterwards.
    """


class OutOfSlots(OutOfBlocks):
    """No free slot for a new sequence (a subclass, so ``except OutOfBlocks`` catches both)."""


class BlockManager:
    """Allocates cache blocks and per-sequence slots to sequences.

    Invariants: a slot is owned by at most one live sequence (or `take_slot` holder); a
    block is owned by one sequence unless it was shared (``adopt``, ``hold``), and it is free
    exactly when nothing references it; every id in ``range(num_blocks)`` /
    ``range(num_slots)`` is either free or referenced; a sequence's block table only changes by
    appending (``allocate``) or dropping a suffix (``truncate``), so earlier entries are stable
    while the sequence lives. Freed ids are reused LIFO (most recently freed first).
    """

    def __init__(self, num_blocks: int, num_slots: int, block_size: int = 128) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.num_slots = num_slots
        self.block_size = block_size
        # Stacks: pop() hands out the lowest ids first on a fresh manager.
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._slots: dict[Hashable, int] = {}
        self._refs = [0] * num_blocks
        # Asked to free something when blocks or slots run short; returns False when it cannot.
        self.reclaim: Callable[[], bool] | None = None

    # ------------------------------------------------------------------ queries
    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks covering ``num_tokens`` tokens: ``ceil(num_tokens / block_size)`` (0 -> 0)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1] (0 when there are no blocks)."""
        if self.num_blocks == 0:
            return 0.0
        return 1.0 - len(self._free_blocks) / self.num_blocks

    @property
    def num_seqs(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table (KeyError if unknown)."""
        return list(self._table(seq_id))

    def slot(self, seq_id: Hashable) -> int:
        """The sequence's slot (KeyError if unknown)."""
        self._table(seq_id)
        return self._slots[seq_id]

    def _table(self, seq_id: Hashable) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id!r}") from None

    def _extra_blocks(self, seq_id: Hashable, new_total_tokens: int) -> int:
        held = len(self._tables.get(seq_id, ()))
        return max(0, self.blocks_needed(new_total_tokens) - held)

    # ------------------------------------------------------------------ mutation
    def _make_room(self, blocks: int, slot: bool) -> bool:
        """Whether `blocks` free blocks (and a free slot) exist, after asking `reclaim`."""
        while len(self._free_blocks) < blocks or (slot and not self._free_slots):
            if self.reclaim is None or not self.reclaim():
                return False
        return True

    def can_allocate(self, seq_id: Hashable, new_total_tokens: int) -> bool:
        """Whether ``allocate(seq_id, new_total_tokens)`` would succeed (reclaiming what
        `reclaim` lets go of to make it so)."""
        return self._make_room(self._extra_blocks(seq_id, new_total_tokens),
                               seq_id not in self._tables)

    def can_allocate_all(self, wants: list[tuple[Hashable, int]]) -> bool:
        """Whether ``allocate`` of every (seq_id, new_total_tokens) in turn would succeed: the
        blocks (and slots, for new sequences) they need together, not each alone."""
        blocks = sum(self._extra_blocks(seq_id, n) for seq_id, n in wants)
        slots = sum(seq_id not in self._tables for seq_id, _ in wants)
        while len(self._free_blocks) < blocks or len(self._free_slots) < slots:
            if self.reclaim is None or not self.reclaim():
                return False
        return True

    def allocate(self, seq_id: Hashable, new_total_tokens: int) -> list[int]:
        """Grow ``seq_id``'s block table to cover ``new_total_tokens`` tokens.

        A new ``seq_id`` is registered and takes a free slot. Guarantees on return:
        ``len(block_table(seq_id)) >= blocks_needed(new_total_tokens)``, existing
        entries are unchanged (only new blocks are appended; a smaller
        ``new_total_tokens`` never shrinks the table, use :meth:`truncate`), and
        every new block is owned by no other live sequence.
        Returns a copy of the full block table. Raises :class:`OutOfSlots` /
        :class:`OutOfBlocks` (leaving all state unchanged) if resources are short.
        """
        new = seq_id not in self._tables
        extra = self._extra_blocks(seq_id, new_total_tokens)
        self._make_room(extra, new)
        if new and not self._free_slots:
            raise OutOfSlots(f"no free slot for sequence {seq_id!r} (all {self.num_slots} slots in use)")
        if extra > len(self._free_blocks):
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {extra} more block(s) for {new_total_tokens} tokens, "
                f"only {len(self._free_blocks)} of {self.num_blocks} free"
            )
        if new:
            self._slots[seq_id] = self._free_slots.pop()
            self._tables[seq_id] = []
        table = self._tables[seq_id]
        for _ in range(extra):
            b = self._free_blocks.pop()
            self._refs[b] = 1
            table.append(b)
        return list(table)

    def adopt(self, seq_id: Hashable, blocks: list[int]) -> list[int]:
        """Register a new sequence whose table starts with `blocks`, which others hold too
        (a cached prefix); it takes a slot. Raises :class:`OutOfSlots` if none can be freed."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        if not self._make_room(0, True):
            raise OutOfSlots(f"no free slot for sequence {seq_id!r} (all {self.num_slots} "
                             "slots in use)")
        self.hold(blocks)
        self._slots[seq_id] = self._free_slots.pop()
        self._tables[seq_id] = list(blocks)
        return list(blocks)

    def hold(self, blocks: list[int]) -> None:
        """One more reference to each of these referenced blocks."""
        for b in blocks:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} is free: only referenced blocks can be shared")
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nothing references is free again."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free_blocks.append(b)

    def take_slot(self) -> int | None:
        """A free slot held outside any sequence (None when none is free)."""
        return self._free_slots.pop() if self._free_slots else None

    def give_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Give back blocks beyond ``blocks_needed(num_tokens)`` (e.g. rejected speculative tokens).

        Keeps the table's prefix and the slot; a ``num_tokens`` at or beyond the current
        coverage is a no-op. Returns the block ids dropped from the table.
        """
        table = self._table(seq_id)
        keep = self.blocks_needed(num_tokens)
        dropped = table[keep:]
        del table[keep:]
        self.release(dropped)
        return dropped

    def free(self, seq_id: Hashable) -> None:
        """Return every block and the slot of ``seq_id`` and forget it (KeyError if unknown/double free)."""
        table = self._table(seq_id)
        self.release(table)
        self._free_slots.append(self._slots.pop(seq_id))
        del self._tables[seq_id]

    def __repr__(self) -> str:
        return (
            f"BlockManager(seqs={self.num_seqs}, free_blocks={self.num_free_blocks}/{self.num_blocks}, "
            f"free_slots={self.num_free_slots}/{self.num_slots}, block_size={self.block_size})"
        )
