import random

import pytest

from dsv4.cache.block_manager import BlockManager, OutOfBlocks, OutOfSlots


def _snapshot(bm: BlockManager, ids) -> tuple:
    return (
        bm.num_free_blocks,
        bm.num_free_slots,
        {s: (bm.block_table(s), bm.slot(s)) for s in ids if s in bm},
    )


def _check_invariants(bm: BlockManager, live: dict) -> None:
    owned_blocks = [b for s in live for b in bm.block_table(s)]
    owned_slots = [bm.slot(s) for s in live]
    assert len(owned_blocks) == len(set(owned_blocks)), "block shared between live sequences"
    assert len(owned_slots) == len(set(owned_slots)), "slot shared between live sequences"
    assert all(0 <= b < bm.num_blocks for b in owned_blocks)
    assert all(0 <= s < bm.num_slots for s in owned_slots)
    assert len(owned_blocks) + bm.num_free_blocks == bm.num_blocks
    assert len(owned_slots) + bm.num_free_slots == bm.num_slots
    assert bm.usage == pytest.approx(len(owned_blocks) / bm.num_blocks)
    for s, ntok in live.items():
        assert len(bm.block_table(s)) == bm.blocks_needed(ntok)


def test_blocks_needed():
    bm = BlockManager(num_blocks=4, num_slots=2)
    assert [bm.blocks_needed(n) for n in (0, 1, 127, 128, 129, 256, 257)] == [0, 1, 1, 1, 2, 2, 3]
    assert BlockManager(4, 2, block_size=16).blocks_needed(33) == 3
    with pytest.raises(ValueError):
        bm.blocks_needed(-1)


def test_allocate_grows_monotonically_and_free_returns_everything():
    bm = BlockManager(num_blocks=10, num_slots=3)
    assert bm.usage == 0.0
    prev: list[int] = []
    for n in (0, 1, 128, 129, 300, 200, 640):
        table = bm.allocate("a", n)
        assert table[: len(prev)] == prev  # existing entries never change
        assert len(table) == max(len(prev), bm.blocks_needed(n))  # never shrinks
        assert table == bm.block_table("a")
        prev = table
    assert len(prev) == 5
    assert bm.num_free_blocks == 5 and bm.num_free_slots == 2
    assert bm.usage == pytest.approx(0.5)
    bm.allocate("b", 1)
    assert bm.slot("a") != bm.slot("b")
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 10 and bm.num_free_slots == 3 and bm.usage == 0.0
    assert "a" not in bm and bm.num_seqs == 0


def test_block_table_is_a_copy():
    bm = BlockManager(4, 1)
    bm.allocate(0, 200).append(99)
    bm.block_table(0).append(99)
    assert len(bm.block_table(0)) == 2


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=3, num_slots=2)
    bm.allocate("a", 3 * 128)
    a_blocks = set(bm.block_table("a"))
    a_slot = bm.slot("a")
    bm.free("a")
    bm.allocate("b", 3 * 128)
    assert set(bm.block_table("b")) == a_blocks
    assert bm.slot("b") == a_slot


def test_truncate():
    bm = BlockManager(num_blocks=8, num_slots=1)
    table = bm.allocate("s", 5 * 128)
    assert bm.truncate("s", 2 * 128 + 1) == table[3:]
    assert bm.block_table("s") == table[:3]
    assert bm.num_free_blocks == 5
    assert bm.truncate("s", 10_000) == []  # beyond coverage: no-op
    assert bm.block_table("s") == table[:3]
    slot = bm.slot("s")
    assert bm.truncate("s", 0) == table[:3]
    assert bm.block_table("s") == [] and bm.slot("s") == slot and bm.num_free_blocks == 8
    assert bm.allocate("s", 129) and len(bm.block_table("s")) == 2
    bm.free("s")
    assert bm.num_free_blocks == 8 and bm.num_free_slots == 1


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, num_slots=4)
    bm.allocate("a", 3 * 128)
    before = _snapshot(bm, ["a", "b"])
    assert not bm.can_allocate("b", 2 * 128)
    with pytest.raises(OutOfBlocks, match="'b'"):
        bm.allocate("b", 2 * 128)
    assert _snapshot(bm, ["a", "b"]) == before and "b" not in bm
    assert not bm.can_allocate("a", 5 * 128)
    with pytest.raises(OutOfBlocks):
        bm.allocate("a", 5 * 128)  # growing an existing sequence
    assert _snapshot(bm, ["a", "b"]) == before
    assert bm.can_allocate("a", 4 * 128) and bm.can_allocate("b", 128)
    assert issubclass(OutOfBlocks, RuntimeError)


def test_out_of_slots_leaves_state_unchanged():
    bm = BlockManager(num_blocks=10, num_slots=2)
    bm.allocate("a", 1)
    bm.allocate("b", 0)
    before = _snapshot(bm, ["a", "b", "c"])
    assert not bm.can_allocate("c", 0)
    with pytest.raises(OutOfSlots):
        bm.allocate("c", 1)
    with pytest.raises(OutOfBlocks):  # OutOfSlots is an OutOfBlocks
        bm.allocate("c", 0)
    assert _snapshot(bm, ["a", "b", "c"]) == before and "c" not in bm
    assert bm.can_allocate("a", 500)  # existing sequences need no new slot
    bm.free("b")
    assert bm.can_allocate("c", 1)


def test_unknown_and_double_free_raise_keyerror():
    bm = BlockManager(4, 2)
    for op in (bm.free, bm.block_table, bm.slot, lambda s: bm.truncate(s, 0)):
        with pytest.raises(KeyError, match="ghost"):
            op("ghost")
    bm.allocate("x", 10)
    bm.free("x")
    with pytest.raises(KeyError, match="'x'"):
        bm.free("x")
    assert bm.num_free_blocks == 4 and bm.num_free_slots == 2


def test_constructor_validation():
    with pytest.raises(ValueError):
        BlockManager(-1, 1)
    with pytest.raises(ValueError):
        BlockManager(1, -1)
    with pytest.raises(ValueError):
        BlockManager(1, 1, block_size=0)
    assert BlockManager(0, 0).usage == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_randomised_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=40, num_slots=6, block_size=8)
    live: dict[int, int] = {}  # seq id -> tokens covered
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.45:  # grow an existing sequence or start a new one
            if live and rng.random() < 0.7:
                sid = rng.choice(list(live))
            else:
                sid, next_id = next_id, next_id + 1
            n = live.get(sid, 0) + rng.randint(0, 40)
            ok = bm.can_allocate(sid, n)
            before = _snapshot(bm, list(live) + [sid])
            try:
                old = bm.block_table(sid) if sid in live else []
                table = bm.allocate(sid, n)
                assert ok
                assert table[: len(old)] == old
                live[sid] = n
            except OutOfBlocks:
                assert not ok
                assert _snapshot(bm, list(live) + [sid]) == before
        elif op < 0.65 and live:
            sid = rng.choice(list(live))
            n = rng.randint(0, live[sid])
            bm.truncate(sid, n)
            live[sid] = n
        elif live:
            sid = rng.choice(list(live))
            bm.free(sid)
            del live[sid]
        _check_invariants(bm, live)
    for sid in list(live):
        bm.free(sid)
    assert bm.num_free_blocks == 40 and bm.num_free_slots == 6


def test_can_allocate_all_counts_what_the_requests_need_together():
    bm = BlockManager(num_blocks=3, num_slots=3, block_size=4)
    bm.allocate("a", 4)
    bm.allocate("b", 4)
    # each of a and b fits the last free block alone; together they need two
    assert bm.can_allocate("a", 5) and bm.can_allocate("b", 5)
    assert not bm.can_allocate_all([("a", 5), ("b", 5)])
    assert bm.can_allocate_all([("a", 5), ("b", 4)])
    # a new sequence needs a slot too: one is free, two new ones need two
    assert bm.can_allocate_all([("c", 0)]) and not bm.can_allocate_all([("c", 0), ("d", 0)])
    # `reclaim` is asked until what they need is free
    freed = []

    def reclaim():
        if freed:
            return False
        bm.free("b")
        freed.append("b")
        return True
    bm.reclaim = reclaim
    assert bm.can_allocate_all([("a", 8), ("c", 4)]) and freed == ["b"]
    bm.allocate("a", 8)
    bm.allocate("c", 4)
    assert bm.num_free_blocks == 0
