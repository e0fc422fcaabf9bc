import random
import time

import numpy as np
import pytest

from scalellm_jax.engine.kv_manager import KVManager


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"rng seed {seed}")  # shown by pytest only when the test fails
    return np.random.default_rng(seed)


def test_page_zero_is_never_handed_out():
    kv = KVManager(num_pages=9, page_size=4, max_pages_per_seq=8, watermark=0)
    assert kv.num_free_pages == kv.num_usable_pages == 8
    assert kv.allocate("a", 20, new_request=True)  # 5 pages
    assert kv.allocate("b", 12, new_request=True)  # 3 pages
    assert kv.num_free_pages == 0
    assert sorted(kv.pages_of("a") + kv.pages_of("b")) == list(range(1, 9))
    assert not kv.allocate("c", 1, new_request=False)
    kv.check_invariants()


def test_grow_allocates_only_missing_pages_and_failure_changes_nothing():
    kv = KVManager(num_pages=6, page_size=4, max_pages_per_seq=10, watermark=0)
    assert kv.pages_needed(0) == 0 and kv.pages_needed(1) == 1 and kv.pages_needed(4) == 1 and kv.pages_needed(5) == 2
    assert kv.allocate("a", 3, new_request=True) and kv.num_owned("a") == 1
    first = kv.pages_of("a")
    assert kv.allocate("a", 4, new_request=False) and kv.pages_of("a") == first  # same page still fits
    assert kv.allocate("a", 5, new_request=False) and kv.num_owned("a") == 2
    assert kv.pages_of("a")[0] == first[0]  # existing pages never move
    assert kv.allocate("a", 2, new_request=False) and kv.num_owned("a") == 2  # shrinking asks are no-ops
    before = (kv.num_free_pages, kv.pages_of("a"))
    assert not kv.allocate("a", 4 * 7, new_request=False)  # needs 5 more, 3 free
    assert (kv.num_free_pages, kv.pages_of("a")) == before
    assert kv.allocate("a", 4 * 5, new_request=False) and kv.num_free_pages == 0
    kv.check_invariants()


def test_watermark_refuses_new_requests_but_not_running_ones():
    kv = KVManager(num_pages=101, page_size=2, max_pages_per_seq=200, watermark=0.05)
    assert kv.watermark_pages == 5
    assert KVManager(11, 2, 8, watermark=0.001).watermark_pages == 1  # at least one page when enabled
    assert KVManager(11, 2, 8, watermark=0).watermark_pages == 0
    assert kv.allocate("a", 2 * 90, new_request=True)  # 90 pages, 10 free
    assert not kv.allocate("b", 2 * 6, new_request=True)  # would leave 4 < 5
    assert kv.num_owned("b") == 0 and kv.num_free_pages == 10
    assert kv.allocate("b", 2 * 5, new_request=True)  # leaves exactly 5
    assert not kv.allocate("c", 1, new_request=True)
    assert kv.allocate("a", 2 * 95, new_request=False)  # running requests may use the reserve
    assert kv.num_free_pages == 0
    kv.check_invariants()


def test_max_pages_per_seq():
    kv = KVManager(num_pages=50, page_size=4, max_pages_per_seq=3, watermark=0)
    assert not kv.allocate("a", 13, new_request=True) and kv.num_owned("a") == 0
    assert kv.allocate("a", 12, new_request=True)
    assert not kv.allocate("a", 13, new_request=False) and kv.num_owned("a") == 3


def test_free_is_idempotent_and_unknown_ids_are_fine():
    kv = KVManager(num_pages=10, page_size=4, max_pages_per_seq=9, watermark=0)
    kv.free("nobody")
    assert kv.allocate("a", 17, new_request=True)
    kv.free("a")
    kv.free("a")
    assert kv.num_free_pages == 9 and kv.num_owned("a") == 0 and kv.pages_of("a") == ()
    assert kv.allocate("a", 0, new_request=True) and kv.num_owned("a") == 0
    kv.check_invariants()


def test_page_table_row_and_slot_mapping(rng):
    page_size = int(rng.integers(1, 9))
    kv = KVManager(num_pages=64, page_size=page_size, max_pages_per_seq=16, watermark=0)
    # interleave two requests so their pages are not contiguous
    for length in range(1, 6 * page_size + 1):
        assert kv.allocate("a", length, new_request=False)
        assert kv.allocate("b", length, new_request=False)
    kv.free("b")
    pages = kv.pages_of("a")
    assert len(pages) == 6
    row = np.full(16, -1, np.int32)
    assert kv.page_table_row("a", row) is row
    np.testing.assert_array_equal(row, list(pages) + [0] * 10)
    np.testing.assert_array_equal(kv.page_table_row("unknown", row), np.zeros(16))
    with pytest.raises(ValueError):
        kv.page_table_row("a", np.zeros(5, np.int32))

    total = 6 * page_size
    start = int(rng.integers(0, total))
    end = int(rng.integers(start, total + 1))
    slots = kv.slot_mapping("a", start, end)
    assert slots.dtype == np.int32 and slots.shape == (end - start,)
    expected = [pages[pos // page_size] * page_size + pos % page_size for pos in range(start, end)]
    np.testing.assert_array_equal(slots, expected)
    assert (slots >= page_size).all()  # nothing lands in the null page
    np.testing.assert_array_equal(
        kv.slot_mapping("a", 0, total), np.concatenate([np.arange(p * page_size, (p + 1) * page_size) for p in pages])
    )
    with pytest.raises(ValueError):
        kv.slot_mapping("a", 0, total + 1)
    with pytest.raises(ValueError):
        kv.slot_mapping("a", 3, 2)


def test_random_workload_keeps_invariants_and_frees_everything(rng):
    num_pages, page_size, max_pages = int(rng.integers(8, 80)), int(rng.integers(1, 17)), int(rng.integers(2, 24))
    kv = KVManager(num_pages, page_size, max_pages, watermark=float(rng.uniform(0, 0.2)))
    lengths: dict[str, int] = {}  # the model: request id → tokens allocated for
    for step in range(3000):
        op = rng.random()
        if op < 0.25 or not lengths:  # new request
            rid, n = f"r{step}", int(rng.integers(1, page_size * max_pages + page_size))
            expect = (kv.pages_needed(n) <= max_pages
                      and kv.pages_needed(n) + kv.watermark_pages <= kv.num_free_pages)
            free_before = kv.num_free_pages
            assert kv.allocate(rid, n, new_request=True) == expect
            if expect:
                lengths[rid] = n
            else:
                assert kv.num_owned(rid) == 0 and kv.num_free_pages == free_before
        else:
            rid = list(lengths)[int(rng.integers(len(lengths)))]
            if op < 0.75:  # grow (a decode or a prompt chunk)
                n = lengths[rid] + int(rng.choice([1, 1, 1, page_size, 3 * page_size]))
                missing = kv.pages_needed(n) - kv.num_owned(rid)
                expect = kv.pages_needed(n) <= max_pages and missing <= kv.num_free_pages
                assert kv.allocate(rid, n, new_request=False) == expect
                if expect:
                    lengths[rid] = n
            else:  # finish, abort or preempt: all free the same way
                kv.free(rid)
                del lengths[rid]
                if rng.random() < 0.3:
                    kv.free(rid)  # a double free (abort racing a finish) must be harmless
        for rid, n in lengths.items():
            assert kv.num_owned(rid) == kv.pages_needed(n)
        kv.check_invariants()
    for rid in list(lengths):
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_free_pages == kv.num_usable_pages


def test_check_invariants_catches_corruption():
    kv = KVManager(num_pages=8, page_size=2, max_pages_per_seq=8, watermark=0)
    kv.allocate("a", 4, new_request=True)
    kv._free.append(kv.pages_of("a")[0])
    with pytest.raises(AssertionError, match="both free and owned"):
        kv.check_invariants()
    kv = KVManager(num_pages=8, page_size=2, max_pages_per_seq=8, watermark=0)
    kv.allocate("a", 4, new_request=True)
    kv._free.pop()
    with pytest.raises(AssertionError, match="neither free nor owned"):
        kv.check_invariants()
    kv = KVManager(num_pages=8, page_size=2, max_pages_per_seq=8, watermark=0)
    kv._free.append(0)
    with pytest.raises(AssertionError, match="null page"):
        kv.check_invariants()


def _grow_and_free(kv, rounds):
    start = time.perf_counter()
    for i in range(rounds):
        rid = f"r{i % 64}"
        for length in range(1, 4 * kv.page_size + 1):
            kv.allocate(rid, length, new_request=False)
        kv.free(rid)
    return time.perf_counter() - start


def test_alloc_and_free_cost_does_not_grow_with_the_pool():
    """O(1) per page: a pool 1000x larger must not make allocation measurably slower."""
    small = KVManager(num_pages=300, page_size=4, max_pages_per_seq=8, watermark=0)
    large = KVManager(num_pages=300_000, page_size=4, max_pages_per_seq=8, watermark=0)
    t_small = min(_grow_and_free(small, 300) for _ in range(3))
    t_large = min(_grow_and_free(large, 300) for _ in range(3))
    assert t_large < 5 * t_small + 0.01, (t_small, t_large)
