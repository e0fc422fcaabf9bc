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
    with pytest.raises(AssertionError, match="two of free, evictable, held"):
        kv.check_invariants()
    kv = KVManager(num_pages=8, page_size=2, max_pages_per_seq=8, watermark=0)
    kv.allocate("a", 4, new_request=True)
    kv._free.pop()
    with pytest.raises(AssertionError, match="neither free, evictable nor held"):
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


# ---------------------------------------------------------------------------- prefix caching


def _cache(kv, rid, tokens, num_tokens=None):
    """Give ``rid`` pages for ``tokens`` (reusing the cached prefix) and cache what it computed."""
    hit = kv.take_prefix(rid, kv.match_prefix(_span(tokens), len(tokens) - 1))
    assert kv.allocate(rid, len(tokens), new_request=True)
    kv.cache_computed(rid, len(tokens) if num_tokens is None else num_tokens, lambda a, b: tokens[a:b])
    kv.check_invariants()
    return hit


def _span(tokens):
    return lambda a, b: tokens[a:b]


def test_a_prompt_reuses_the_full_cached_pages_of_an_earlier_one_but_never_its_partial_page():
    kv = KVManager(num_pages=32, page_size=4, max_pages_per_seq=8, watermark=0, enable_prefix_caching=True)
    system = list(range(10, 20))  # 2 full pages and 2 tokens
    assert _cache(kv, "a", system + [1, 2, 3]) == 0  # 13 tokens: 3 full pages cached
    assert kv.num_cached_pages == 3
    assert _cache(kv, "b", system + [7, 7, 7, 7, 7]) == 8  # shares the 2 pages of the system prompt only
    assert kv.pages_of("b")[:2] == kv.pages_of("a")[:2] and kv.pages_of("b")[2] != kv.pages_of("a")[2]
    assert [kv.refcount(p) for p in kv.pages_of("a")] == [2, 2, 1, 1]
    # A prompt of exactly 3 full pages reuses 2: its last token must go through the model to be sampled from.
    assert len(kv.match_prefix(_span(system + [1, 2]), 11)) == 2
    # Same tokens after a different start: no match (a page is keyed by everything before it).
    assert kv.match_prefix(_span([99] + system[1:] + [1, 2, 3]), 12) == []
    kv.free("a")
    assert kv.num_free_pages == 31 - 4 and kv.num_evictable_pages == 1  # b holds 4 pages; a's third is evictable
    kv.free("b")
    assert kv.num_free_pages == kv.num_usable_pages and kv.num_cached_pages == 4
    kv.check_invariants()


def test_unheld_cached_pages_are_evicted_tail_first_and_take_their_successors_along():
    kv = KVManager(num_pages=9, page_size=2, max_pages_per_seq=8, watermark=0, enable_prefix_caching=True)
    tokens = list(range(3, 12))  # 4 full pages
    _cache(kv, "a", tokens)
    a = kv.pages_of("a")
    kv.free("a")
    assert kv.num_free_pages == 8 and kv.num_evictable_pages == 4
    assert kv.allocate("b", 2 * 4, new_request=True)  # the 4 never-used pages first
    assert kv.num_cached_pages == 4
    assert kv.allocate("b", 2 * 5, new_request=True)  # then the tail of a's prefix
    assert kv.pages_of("b")[-1] == a[3] and kv.num_cached_pages == 3
    assert len(kv.match_prefix(_span(tokens), 8)) == 3
    kv.check_invariants()
    # Evicting the head uncaches what follows it: unreachable pages must not linger in the cache.
    kv._evictable.move_to_end(a[0], last=False)
    assert kv.allocate("b", 2 * 6, new_request=True) and kv.pages_of("b")[-1] == a[0]
    assert kv.num_cached_pages == 0 and kv.num_free_pages == 2
    kv.check_invariants()


def test_a_page_computed_twice_is_kept_once():
    kv = KVManager(num_pages=16, page_size=4, max_pages_per_seq=8, watermark=0, enable_prefix_caching=True)
    tokens = list(range(20, 29))
    for rid in ("a", "b"):  # both miss (neither has computed anything yet), then both compute
        assert kv.match_prefix(_span(tokens), 8) == [] and kv.allocate(rid, 9, new_request=True)
    kv.cache_computed("a", 9, _span(tokens))
    kv.cache_computed("b", 9, _span(tokens))
    assert kv.pages_of("a")[:2] == kv.pages_of("b")[:2] and kv.num_free_pages == 16 - 1 - 4
    kv.check_invariants()


def test_swapping_out_a_shared_page_leaves_it_to_its_other_holders():
    kv = KVManager(num_pages=16, page_size=4, max_pages_per_seq=8, watermark=0, num_host_pages=8,
                   enable_prefix_caching=True)
    tokens = list(range(30, 42))
    _cache(kv, "a", tokens)
    _cache(kv, "b", tokens + [5, 6])
    shared = kv.pages_of("a")[:2]
    assert kv.swap_out("a", 12)[:2] == shared  # copied out, but b still holds them
    assert [kv.refcount(p) for p in shared] == [1, 1] and kv.pages_of("b")[:2] == shared
    pages = kv.swap_in("a", 12)
    assert not set(pages) & set(kv.pages_of("b"))  # fresh pages for the copy back
    kv.cache_computed("a", 12, _span(tokens))  # and, once run, a's copies give way to the cached pages
    assert kv.pages_of("a")[:2] == shared
    kv.check_invariants()


def test_kv_restored_from_a_lossy_swap_is_never_cached():
    kv = KVManager(num_pages=16, page_size=4, max_pages_per_seq=8, watermark=0, num_host_pages=8,
                   enable_prefix_caching=True, exact_swap=False)
    tokens = list(range(30, 42))
    assert kv.allocate("a", 12, new_request=True)
    kv.swap_out("a", 12)
    kv.swap_in("a", 13)
    kv.cache_computed("a", 13, _span(tokens + [1]))
    assert kv.num_cached_pages == 0 and kv.match_prefix(_span(tokens), 11) == []
    kv.free("a")
    assert _cache(kv, "a", tokens) == 0 and kv.num_cached_pages == 3  # recomputed from its tokens: exact again
    kv.check_invariants()


def test_without_prefix_caching_nothing_is_cached():
    kv = KVManager(num_pages=16, page_size=4, max_pages_per_seq=8, watermark=0)
    tokens = list(range(30, 42))
    _cache(kv, "a", tokens)
    kv.free("a")
    assert kv.num_cached_pages == 0 and kv.match_prefix(_span(tokens), 11) == []
    assert kv.num_free_pages == kv.num_usable_pages


def test_random_operations_keep_refcounts_and_cache_contents_exact(rng):
    """Random takes, grows, caches, trims, swaps and frees over prompts sharing prefixes: after every
    operation the bookkeeping is consistent, and every page a lookup returns holds the KV of exactly
    the looked-up tokens (a fake device tracks the token prefix each page's KV was computed from)."""
    ps = int(rng.choice([1, 2, 4]))
    kv = KVManager(num_pages=int(rng.integers(8, 40)), page_size=ps, max_pages_per_seq=12, watermark=0,
                   num_host_pages=int(rng.choice([0, 6, 50])), enable_prefix_caching=True)
    base = rng.integers(0, 5, 12 * ps).tolist()  # a small alphabet: lots of equal pages after different starts
    device, seqs, host = {}, {}, {}
    for _ in range(600):
        op = rng.random()
        if op < 0.3 and len(seqs) < 6:  # a new sequence
            rid = f"s{rng.integers(1 << 30)}"
            n = int(rng.integers(1, 12 * ps))
            tokens = (base[:int(rng.integers(0, n + 1))] + rng.integers(0, 5, n).tolist())[:n]
            hit = kv.match_prefix(_span(tokens), n - 1)
            for j, page in enumerate(hit):
                assert device[page] == tuple(tokens[:(j + 1) * ps])
            seqs[rid] = [tokens, kv.take_prefix(rid, hit)]
        elif op < 0.6 and seqs:  # compute some tokens
            rid = list(seqs)[int(rng.integers(len(seqs)))]
            tokens, done = seqs[rid]
            if rid in host or done == len(tokens):
                continue
            end = int(rng.integers(done + 1, len(tokens) + 1))
            if not kv.allocate(rid, end, new_request=False):
                continue
            pages = kv.pages_of(rid)
            for i in range(done // ps, kv.pages_needed(end)):
                assert kv.refcount(pages[i]) == 1 and not kv.is_cached(pages[i])
                device[pages[i]] = tuple(tokens[:min((i + 1) * ps, end)])
            kv.cache_computed(rid, end, _span(tokens))
            seqs[rid][1] = end
        elif op < 0.7 and seqs:  # preempted: keep the computed pages only
            rid = list(seqs)[int(rng.integers(len(seqs)))]
            if rid not in host:
                kv.trim(rid, seqs[rid][1])
        elif op < 0.8 and seqs:  # swap out or in
            rid = list(seqs)[int(rng.integers(len(seqs)))]
            tokens, done = seqs[rid]
            if rid in host:
                pages = kv.swap_in(rid, done)
                if pages is not None:
                    device.update(zip(pages, host.pop(rid), strict=True))
            elif kv.can_swap_out(rid, done):
                host[rid] = [device[p] for p in kv.swap_out(rid, done)]
        elif seqs:  # finish
            rid = list(seqs)[int(rng.integers(len(seqs)))]
            kv.free(rid)
            del seqs[rid]
            host.pop(rid, None)
        kv.check_invariants()
        for rid, (tokens, done) in seqs.items():  # every sequence still reads its own KV
            for i, page in enumerate(kv.pages_of(rid)[:kv.pages_needed(done)] if rid not in host else ()):
                held = min((i + 1) * ps, done)
                assert device[page][:held] == tuple(tokens[:held])
    for rid in list(seqs):
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_free_pages == kv.num_usable_pages and kv.num_free_host_pages == kv.num_host_pages
