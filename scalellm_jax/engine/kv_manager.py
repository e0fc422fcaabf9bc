"""Host-side bookkeeping for the paged KV cache: which physical pages each request holds, and the
prefix cache of computed pages that later requests with the same leading tokens reuse.

The device holds per-layer KV pools shaped ``[num_pages, page_size, ...]``; this object only
decides page ownership and produces the int32 page-table rows and slot mappings the jitted step
reads. It is plain Python/numpy and never touches the device.

Page 0 is reserved as the *null page* and never handed out. Fixed-shape device batches pad their
page-table rows (and slot mappings of padding tokens) with 0, so padding reads and writes land in
a page no request owns; usable pages are ``1 .. num_pages - 1``.

Prefix caching. A full page whose KV is computed is *cached* under the key (the page before it in
its sequence, or the null page for the first, the page's own tokens). Because the first element
names the physical page holding the previous tokens, whose key names the one before, a key stands
for the whole token prefix ending with the page; two prompts share a page exactly when their
tokens agree up to its end. Keys are compared by value (Python dict equality), so no hash
collision can ever hand one prompt another's KV, and the KV dtype needs no place in the key: the
cache lives with the pools it describes. A page is refcounted by the requests holding it; when the
last one lets go, a cached page stays where it is, evictable, and is reclaimed only when free pages
run out. Eviction is least recently released first, with a request's pages released from its last
to its first: a page is useful only with every page before it, so the tail of a prefix should go
before its head (vLLM's order, for the same reason). A cached page's holders always hold the page
before it (they reached it through that page), so an evictable page's cached successors are
evictable too; evicting a page uncaches them with it, so every cached page stays reachable from
the start of some prompt. Only full pages are cached: the partial last page of a sequence is never
shared, so nothing ever writes into a page another request reads.

Host swap space: a preempted request's pages can move to host memory (``swap_out``) and back
(``swap_in``). This object only accounts for them (``num_host_pages`` is the limit); the runner
copies the data and keeps the host arrays. Swapping out lets go of the device pages; those that
others hold, or that are cached, keep their contents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a host module: no JAX at import (the resolved config's module imports it)
    from scalellm_jax.engine.resolved import ResolvedConfig

NULL_PAGE = 0
_UNCACHEABLE = -1  # a request whose KV is not exact (restored from a lossy swap): never cached

TokenIds = Callable[[int, int], Sequence[int]]  # (start, end) -> the sequence's tokens in [start, end)


class KVManager:
    """Page ownership with O(1) allocation: free pages, refcounts, a page list per request, and the
    prefix cache (``enable_prefix_caching``).

    ``watermark`` (a fraction of ``num_pages``) is kept free when *admitting* requests, so requests
    that are already running can grow into the reserve: a decode step crossing a page boundary then
    almost never has to preempt anyone. ``watermark == 0`` disables the reserve. Evictable cached
    pages count as free everywhere.
    """

    @classmethod
    def for_engine(cls, resolved: ResolvedConfig) -> KVManager:
        """The engine's KV manager: its pool and host swap space as ``resolved`` sized them."""
        return cls(resolved.num_pages, resolved.engine.page_size, resolved.max_pages_per_seq,
                   num_host_pages=resolved.num_host_pages, enable_prefix_caching=resolved.engine.enable_prefix_caching,
                   exact_swap=resolved.exact_swap)

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int, watermark: float = 0.01,
                 num_host_pages: int = 0, enable_prefix_caching: bool = False, exact_swap: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq must be >= 1, got {max_pages_per_seq}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        if num_host_pages < 0:
            raise ValueError(f"num_host_pages must be >= 0, got {num_host_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.watermark_pages = max(1, int(watermark * num_pages)) if watermark > 0 else 0
        self.enable_prefix_caching = enable_prefix_caching
        # Reversed so pops hand out low page ids first (easier to read in debugging, no other reason).
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))  # unheld and uncached
        self._refs = [0] * num_pages  # requests holding each page
        self._pages: dict[str, list[int]] = {}
        # The prefix cache: page -> key, key -> page, page -> its cached successors; unheld cached pages
        # in eviction order (least recently released first).
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._page_of: dict[tuple[int, tuple[int, ...]], int] = {}
        self._successors: dict[int, set[int]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._num_cached: dict[str, int] = {}  # request id -> its leading pages that are cached (or _UNCACHEABLE)
        self.num_host_pages = num_host_pages
        self._host: dict[str, int] = {}  # request id → pages it holds in host swap space
        self._host_used = 0
        self.exact_swap = exact_swap

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages no request holds: never used, or cached and evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix cache, held by requests or not."""
        return len(self._key_of)

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages no request holds (kept for future hits, reclaimed when pages run out)."""
        return len(self._evictable)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_owned(self, request_id: str) -> int:
        return len(self._pages.get(request_id, ()))

    def pages_of(self, request_id: str) -> tuple[int, ...]:
        """The request's pages in sequence order (empty for an unknown request)."""
        return tuple(self._pages.get(request_id, ()))

    def refcount(self, page: int) -> int:
        """How many requests hold ``page``."""
        return self._refs[page]

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    # ------------------------------------------------------------------ allocation

    def allocate(self, request_id: str, total_tokens: int, *, new_request: bool) -> bool:
        """Make ``request_id`` hold enough pages for ``total_tokens`` tokens; all or nothing.

        Only the missing pages are taken, so calling this every step with the request's new length
        costs O(pages added). Returns False, changing nothing, when the request would exceed
        ``max_pages_per_seq`` or the pool is short; for ``new_request=True`` the pool must also keep
        ``watermark_pages`` free afterwards (see the class docstring). False is the scheduler's cue
        to stop admitting or to preempt. New pages come from the never-used ones first, then from
        evicting cached pages.
        """
        if total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
        need = self.pages_needed(total_tokens)
        owned = self._pages.get(request_id)
        missing = need - (len(owned) if owned is not None else 0)
        if missing <= 0:
            return True
        if need > self.max_pages_per_seq:
            return False
        reserve = self.watermark_pages if new_request else 0
        if self.num_free_pages < missing + reserve:
            return False
        if owned is None:
            owned = self._pages[request_id] = []
            self._num_cached.setdefault(request_id, 0)
        free, refs = self._free, self._refs
        for _ in range(missing):
            page = free.pop() if free else self._evict()
            refs[page] = 1
            owned.append(page)
        return True

    def _evict(self) -> int:
        """Take the least recently released cached page out of the cache (with its cached successors)."""
        page, _ = self._evictable.popitem(last=False)
        self._uncache(page)
        return page

    def _uncache(self, page: int) -> None:
        parent = self._key_of[page][0]
        siblings = self._successors[parent]
        siblings.discard(page)
        if not siblings:
            del self._successors[parent]
        stack = [page]
        while stack:
            p = stack.pop()
            del self._page_of[self._key_of.pop(p)]
            for successor in self._successors.pop(p, ()):
                # an unheld page's cached successors are unheld too (their holders would hold it)
                del self._evictable[successor]
                self._free.append(successor)
                stack.append(successor)

    def _release(self, pages: list[int]) -> None:
        """Let go of ``pages`` (one reference each), last first: the tail of a prefix is evicted first."""
        refs = self._refs
        for page in reversed(pages):
            refs[page] -= 1
            if refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Let go of the request's pages past those holding its first ``num_tokens`` tokens."""
        pages = self._pages.get(request_id)
        keep = self.pages_needed(num_tokens)
        if pages is None or len(pages) <= keep:
            return
        self._release(pages[keep:])
        del pages[keep:]
        if self._num_cached[request_id] > keep:
            self._num_cached[request_id] = keep
        if not pages:
            del self._pages[request_id], self._num_cached[request_id]

    def free(self, request_id: str) -> None:
        """Let go of all of the request's pages (device and host). Idempotent."""
        pages = self._pages.pop(request_id, None)
        if pages:
            self._release(pages)
        self._num_cached.pop(request_id, None)
        self._host_used -= self._host.pop(request_id, 0)

    # ------------------------------------------------------------------ prefix cache

    def match_prefix(self, token_ids: TokenIds, num_tokens: int) -> list[int]:
        """The cached pages holding the longest cached prefix of a sequence's first ``num_tokens`` tokens
        (whole pages only). Looks only; ``take_prefix`` claims them."""
        if not self.enable_prefix_caching:
            return []
        ps, parent, pages = self.page_size, NULL_PAGE, []
        for j in range(num_tokens // ps):
            page = self._page_of.get((parent, tuple(token_ids(j * ps, (j + 1) * ps))))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def take_prefix(self, request_id: str, pages: list[int]) -> int:
        """Make a request that holds nothing hold the cached ``pages`` (from ``match_prefix``, called
        since with nothing evicted in between); returns the number of tokens they hold."""
        if request_id in self._pages or request_id in self._host:
            raise ValueError(f"{request_id!r} already holds KV pages")
        if not pages:
            return 0
        refs = self._refs
        for page in pages:
            if page not in self._key_of:
                raise ValueError(f"page {page} is not in the prefix cache")
            if refs[page] == 0:
                del self._evictable[page]
            refs[page] += 1
        self._pages[request_id] = list(pages)
        self._num_cached[request_id] = len(pages)
        return len(pages) * self.page_size

    def cache_computed(self, request_id: str, num_computed_tokens: int, token_ids: TokenIds) -> None:
        """Put the request's full pages among its first ``num_computed_tokens`` (whose KV is now written)
        into the prefix cache. A page whose content is cached already is replaced by the cached one,
        and its own goes back to the free pages."""
        done = self._num_cached.get(request_id)
        full = num_computed_tokens // self.page_size
        if not self.enable_prefix_caching or done is None or done == _UNCACHEABLE or full <= done:
            return
        pages, ps, refs = self._pages[request_id], self.page_size, self._refs
        for j in range(done, full):
            parent = pages[j - 1] if j else NULL_PAGE
            key = (parent, tuple(token_ids(j * ps, (j + 1) * ps)))
            cached = self._page_of.get(key)
            if cached is None:
                self._key_of[pages[j]], self._page_of[key] = key, pages[j]
                self._successors.setdefault(parent, set()).add(pages[j])
            else:  # computed twice (e.g. by two requests in parallel): keep one copy
                if refs[cached] == 0:
                    del self._evictable[cached]
                refs[cached] += 1
                self._release([pages[j]])
                pages[j] = cached
        self._num_cached[request_id] = full

    # ------------------------------------------------------------------ host swap space

    @property
    def num_free_host_pages(self) -> int:
        return self.num_host_pages - self._host_used

    def num_host_owned(self, request_id: str) -> int:
        return self._host.get(request_id, 0)

    def can_swap_out(self, request_id: str, num_tokens: int) -> bool:
        """Whether the KV of the request's first ``num_tokens`` tokens fits in host swap space."""
        n = self.pages_needed(num_tokens)
        return 0 < n <= min(self.num_owned(request_id), self.num_free_host_pages) and request_id not in self._host

    def swap_out(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """Move the KV of the request's first ``num_tokens`` tokens to host swap space.

        The request lets go of all its device pages; returns those holding the swapped tokens, in
        order. The caller must copy them out before anything else writes to them (the engine
        dispatches the copy before the step that may reuse them). Pages other requests hold stay
        theirs, untouched.
        """
        if not self.can_swap_out(request_id, num_tokens):
            raise ValueError(f"cannot swap out {num_tokens} tokens of {request_id!r}: it owns "
                             f"{self.num_owned(request_id)} pages, {self.num_free_host_pages} host pages free")
        pages = self._pages.pop(request_id)
        self._num_cached.pop(request_id, None)
        self._release(pages)
        n = self.pages_needed(num_tokens)
        self._host[request_id] = n
        self._host_used += n
        return tuple(pages[:n])

    def swap_in(self, request_id: str, total_tokens: int) -> tuple[int, ...] | None:
        """Give a swapped-out request device pages for ``total_tokens`` and release its host pages.

        Returns the device pages that receive the swapped KV (in sequence order), or None,
        changing nothing, when the device pool is short (admission rules, as ``allocate``).
        Without ``exact_swap`` (the KV comes back rounded, e.g. by int8 swap compression) none of the
        request's pages is ever cached: another prompt would get KV it would not compute itself.
        """
        n_host = self._host.get(request_id)
        if n_host is None:
            raise ValueError(f"{request_id!r} has nothing in host swap space")
        if self.pages_needed(total_tokens) < n_host:
            raise ValueError(f"swap_in of {request_id!r} needs room for its {n_host} swapped pages")
        if not self.allocate(request_id, total_tokens, new_request=True):
            return None
        if not self.exact_swap:
            self._num_cached[request_id] = _UNCACHEABLE
        del self._host[request_id]
        self._host_used -= n_host
        return tuple(self._pages[request_id][:n_host])

    # ------------------------------------------------------------------ device batch rows

    def page_table_row(self, request_id: str, out: np.ndarray) -> np.ndarray:
        """Fill a preallocated int32 row with the request's pages, padded with the null page."""
        pages = self._pages.get(request_id, ())
        if len(pages) > out.shape[0]:
            raise ValueError(f"page table row has {out.shape[0]} entries; {request_id!r} owns {len(pages)} pages")
        out[: len(pages)] = pages
        out[len(pages):] = NULL_PAGE
        return out

    def slot_mapping(self, request_id: str, start: int, end: int) -> np.ndarray:
        """Flat cache slots (``page * page_size + offset``) for token positions ``[start, end)``."""
        pages = self._pages.get(request_id, ())
        if not 0 <= start <= end <= len(pages) * self.page_size:
            raise ValueError(
                f"positions [{start}, {end}) are outside the {len(pages)} pages {request_id!r} owns "
                f"(page_size {self.page_size})"
            )
        positions = np.arange(start, end, dtype=np.int64)
        page_ids = np.asarray(pages, dtype=np.int64)[positions // self.page_size]
        return (page_ids * self.page_size + positions % self.page_size).astype(np.int32)

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent: every usable page is free,
        evictable or held; refcounts count holders; the cache is a tree of full pages rooted at the
        null page whose held pages are each a prefix of their holders' page lists.

        O(pages): meant for tests and debugging, not the serving loop. Explicit raises (not
        ``assert``) so the check also works under ``python -O``.
        """
        holders = [0] * self.num_pages
        for request_id, pages in self._pages.items():
            if len(pages) > self.max_pages_per_seq:
                raise AssertionError(f"{request_id!r} owns {len(pages)} pages > max_pages_per_seq")
            if len(set(pages)) != len(pages):
                raise AssertionError(f"{request_id!r} holds a page twice")
            for page in pages:
                if not NULL_PAGE < page < self.num_pages:
                    raise AssertionError(f"{request_id!r} owns invalid page {page}")
                holders[page] += 1
            cached = self._num_cached.get(request_id)
            if cached is None:
                raise AssertionError(f"{request_id!r} holds pages but has no cache progress")
            k = max(cached, 0)
            for j, page in enumerate(pages):
                key = self._key_of.get(page)
                if (key is not None) != (j < k):
                    raise AssertionError(f"{request_id!r}: page {j} ({page}) cached={key is not None}, "
                                         f"but {k} leading pages are")
                if key is not None and key[0] != (pages[j - 1] if j else NULL_PAGE):
                    raise AssertionError(f"{request_id!r}: cached page {page} does not follow its previous page")
        if holders != self._refs:
            bad = [p for p in range(self.num_pages) if holders[p] != self._refs[p]]
            raise AssertionError(f"refcounts of pages {bad[:8]} do not count their holders")
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            raise AssertionError("a page is in the free list twice")
        if NULL_PAGE in free or NULL_PAGE in evictable or not all(NULL_PAGE < p < self.num_pages for p in free):
            raise AssertionError("the free pages hold the null page or an out-of-range page")
        held = {p for p in range(self.num_pages) if self._refs[p]}
        if free & held or evictable & held or free & evictable:
            raise AssertionError(f"pages {sorted((free & held) | (evictable & held) | (free & evictable))[:8]} "
                                 "are in two of free, evictable, held")
        lost = self.num_usable_pages - len(free) - len(evictable) - len(held)
        if lost:
            raise AssertionError(f"{lost} usable pages are neither free, evictable nor held")
        if free & set(self._key_of) or evictable - set(self._key_of):
            raise AssertionError("free pages must be uncached and evictable pages cached")
        if {self._page_of.get(k) for k in self._key_of.values()} != set(self._key_of) or len(self._page_of) != len(
                self._key_of):
            raise AssertionError("the cache's key and page maps disagree")
        for parent, successors in self._successors.items():
            for page in successors:
                if self._key_of.get(page, (None,))[0] != parent:
                    raise AssertionError(f"page {page} is listed as a successor of {parent} but is not cached after it")
        for page, (parent, tokens) in self._key_of.items():
            if len(tokens) != self.page_size or (parent != NULL_PAGE and parent not in self._key_of):
                raise AssertionError(f"cached page {page} is partial or follows an uncached page")
            if page not in self._successors.get(parent, ()):
                raise AssertionError(f"cached page {page} is missing from its parent's successors")
            if self._refs[page] and parent != NULL_PAGE and not self._refs[parent]:
                raise AssertionError(f"held cached page {page} follows an unheld page")
        if self._host_used != sum(self._host.values()) or not 0 <= self._host_used <= self.num_host_pages:
            raise AssertionError(f"host swap accounting is off: {self._host_used} used of {self.num_host_pages}")
        on_both = set(self._host).intersection(self._pages)
        if on_both:
            raise AssertionError(f"requests {sorted(on_both)[:8]} hold both host and device pages")
