"""Host-side bookkeeping for the paged KV cache: which physical pages each request owns.

The device holds per-layer KV pools shaped ``[num_pages, page_size, ...]``; this object only
decides page ownership and produces the int32 page-table rows and slot mappings the jitted step
reads. It is plain Python/numpy and never touches the device.

Page 0 is reserved as the *null page* and never handed out. Fixed-shape device batches pad their
page-table rows (and slot mappings of padding tokens) with 0, so padding reads and writes land in
a page no request owns; usable pages are ``1 .. num_pages - 1``.

Host swap space: a preempted request's pages can move to host memory (``swap_out``) and back
(``swap_in``). This object only accounts for them (``num_host_pages`` is the limit); the runner
copies the data and keeps the host arrays.
"""

from __future__ import annotations

import numpy as np

NULL_PAGE = 0


class KVManager:
    """Page ownership with O(1) allocation: a stack of free page ids plus a page list per request.

    ``watermark`` (a fraction of ``num_pages``) is kept free when *admitting* requests, so requests
    that are already running can grow into the reserve: a decode step crossing a page boundary then
    almost never has to preempt anyone. ``watermark == 0`` disables the reserve.
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int, watermark: float = 0.01,
                 num_host_pages: int = 0):
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
        # Reversed so pops hand out low page ids first (easier to read in debugging, no other reason).
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))
        self._pages: dict[str, list[int]] = {}
        self.num_host_pages = num_host_pages
        self._host: dict[str, int] = {}  # request id → pages it holds in host swap space
        self._host_used = 0

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_owned(self, request_id: str) -> int:
        return len(self._pages.get(request_id, ()))

    def pages_of(self, request_id: str) -> tuple[int, ...]:
        """The request's pages in sequence order (empty for an unknown request)."""
        return tuple(self._pages.get(request_id, ()))

    def allocate(self, request_id: str, total_tokens: int, *, new_request: bool) -> bool:
        """Make ``request_id`` own enough pages for ``total_tokens`` tokens; all or nothing.

        Only the missing pages are taken, so calling this every step with the request's new length
        costs O(pages added). Returns False, changing nothing, when the request would exceed
        ``max_pages_per_seq`` or the pool is short; for ``new_request=True`` the pool must also keep
        ``watermark_pages`` free afterwards (see the class docstring). False is the scheduler's cue
        to stop admitting or to preempt.
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
        if len(self._free) < missing + reserve:
            return False
        if owned is None:
            owned = self._pages[request_id] = []
        free = self._free
        for _ in range(missing):
            owned.append(free.pop())
        return True

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Free the request's pages past those holding its first ``num_tokens`` tokens."""
        pages = self._pages.get(request_id)
        keep = self.pages_needed(num_tokens)
        if pages is None or len(pages) <= keep:
            return
        self._free.extend(reversed(pages[keep:]))
        del pages[keep:]
        if not pages:
            del self._pages[request_id]

    def free(self, request_id: str) -> None:
        """Return all of the request's pages (device and host) to the pools. Idempotent."""
        pages = self._pages.pop(request_id, None)
        if pages:
            self._free.extend(reversed(pages))
        self._host_used -= self._host.pop(request_id, 0)

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

        All its device pages become free; returns those holding the swapped tokens, in order.
        The caller must copy them out before anything else writes to them (the engine dispatches
        the copy before the step that may reuse them).
        """
        if not self.can_swap_out(request_id, num_tokens):
            raise ValueError(f"cannot swap out {num_tokens} tokens of {request_id!r}: it owns "
                             f"{self.num_owned(request_id)} pages, {self.num_free_host_pages} host pages free")
        pages = self._pages.pop(request_id)
        self._free.extend(reversed(pages))
        n = self.pages_needed(num_tokens)
        self._host[request_id] = n
        self._host_used += n
        return tuple(pages[:n])

    def swap_in(self, request_id: str, total_tokens: int) -> tuple[int, ...] | None:
        """Give a swapped-out request device pages for ``total_tokens`` and release its host pages.

        Returns the device pages that receive the swapped KV (in sequence order), or None,
        changing nothing, when the device pool is short (admission rules, as ``allocate``).
        """
        n_host = self._host.get(request_id)
        if n_host is None:
            raise ValueError(f"{request_id!r} has nothing in host swap space")
        if self.pages_needed(total_tokens) < n_host:
            raise ValueError(f"swap_in of {request_id!r} needs room for its {n_host} swapped pages")
        if not self.allocate(request_id, total_tokens, new_request=True):
            return None
        del self._host[request_id]
        self._host_used -= n_host
        return tuple(self._pages[request_id][:n_host])

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

    def check_invariants(self) -> None:
        """Raise AssertionError unless every usable page is free or owned by exactly one request.

        O(pages): meant for tests and debugging, not the serving loop. Explicit raises (not
        ``assert``) so the check also works under ``python -O``.
        """
        seen: dict[int, str] = {}
        for request_id, pages in self._pages.items():
            if len(pages) > self.max_pages_per_seq:
                raise AssertionError(f"{request_id!r} owns {len(pages)} pages > max_pages_per_seq")
            for page in pages:
                if page in seen:
                    raise AssertionError(f"page {page} is owned by both {seen[page]!r} and {request_id!r}")
                if not NULL_PAGE < page < self.num_pages:
                    raise AssertionError(f"{request_id!r} owns invalid page {page}")
                seen[page] = request_id
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is in the free list twice")
        if not all(NULL_PAGE < page < self.num_pages for page in free):
            raise AssertionError("the free list holds the null page or an out-of-range page")
        both = free.intersection(seen)
        if both:
            raise AssertionError(f"pages {sorted(both)[:8]} are both free and owned")
        lost = self.num_usable_pages - len(free) - len(seen)
        if lost:
            raise AssertionError(f"{lost} usable pages are neither free nor owned")
        if self._host_used != sum(self._host.values()) or not 0 <= self._host_used <= self.num_host_pages:
            raise AssertionError(f"host swap accounting is off: {self._host_used} used of {self.num_host_pages}")
        on_both = set(self._host).intersection(self._pages)
        if on_both:
            raise AssertionError(f"requests {sorted(on_both)[:8]} hold both host and device pages")
