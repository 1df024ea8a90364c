"""Block and slot bookkeeping for the paged compressed KV cache (CPU only, no torch).

DeepSeek-V4's compressed KV cache is paged in blocks of ``block_size`` (128) tokens:
block ``b`` of a sequence holds that sequence's compressed rows for tokens
``[b * block_size, (b + 1) * block_size)`` in every layer. Every running sequence
also holds exactly one *slot*: a row index into per-sequence fixed-size buffers
(sliding-window ring, compressor state).
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["BlockManager", "OutOfBlocks", "OutOfSlots"]


class OutOfBlocks(RuntimeError):
    """Not enough free blocks (or slots, see :class:`OutOfSlots`) for an allocation.

    Raised before any state is modified: the manager is unchanged afterwards.
    """


class OutOfSlots(OutOfBlocks):
    """No free slot for a new sequence (a subclass, so ``except OutOfBlocks`` catches both)."""


class BlockManager:
    """Allocates cache blocks and per-sequence slots to sequences.

    Invariants: a block or slot is owned by at most one live sequence; every id in
    ``range(num_blocks)`` / ``range(num_slots)`` is either free or owned; a sequence's
    block table only changes by appending (``allocate``) or dropping a suffix
    (``truncate``), so earlier entries are stable while the sequence lives.
    Freed ids are reused LIFO (most recently freed first).
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
    def can_allocate(self, seq_id: Hashable, new_total_tokens: int) -> bool:
        """Whether ``allocate(seq_id, new_total_tokens)`` would succeed."""
        if seq_id not in self._tables and not self._free_slots:
            return False
        return self._extra_blocks(seq_id, new_total_tokens) <= len(self._free_blocks)

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
        if new and not self._free_slots:
            raise OutOfSlots(f"no free slot for sequence {seq_id!r} (all {self.num_slots} slots in use)")
        extra = self._extra_blocks(seq_id, new_total_tokens)
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
            table.append(self._free_blocks.pop())
        return list(table)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Give back blocks beyond ``blocks_needed(num_tokens)`` (e.g. rejected speculative tokens).

        Keeps the table's prefix and the slot; a ``num_tokens`` at or beyond the current
        coverage is a no-op. Returns the freed block ids.
        """
        table = self._table(seq_id)
        keep = self.blocks_needed(num_tokens)
        freed = table[keep:]
        del table[keep:]
        self._free_blocks.extend(reversed(freed))
        return freed

    def free(self, seq_id: Hashable) -> None:
        """Return every block and the slot of ``seq_id`` and forget it (KeyError if unknown/double free)."""
        table = self._table(seq_id)
        self._free_blocks.extend(reversed(table))
        self._free_slots.append(self._slots.pop(seq_id))
        del self._tables[seq_id]

    def __repr__(self) -> str:
        return (
            f"BlockManager(seqs={self.num_seqs}, free_blocks={self.num_free_blocks}/{self.num_blocks}, "
            f"free_slots={self.num_free_slots}/{self.num_slots}, block_size={self.block_size})"
        )
