"""The decode memory budget: how much memory the images being decoded at once may hold, all told.

The pixel limit bounds one image's pixels, not its bytes: at 40 MP a WebP decodes through about 640 MB and a
JPEG drafted to 1/8 scale through 6 MB. Each decode thread can hold one such image, so without a budget the
worst case grows with `decode_threads`, and a pod's memory limit would be met by an OOM kill that loses every
request in flight. With it, each decode reserves its estimate (`decoding.decode_bytes`) before Pillow loads a
pixel and gives it back once the image is preprocessed; a decode that does not fit waits, in arrival order,
for the others to finish. An image whose estimate alone exceeds the budget is refused by the decoder.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from service.errors import DeadlineExceeded, ImageTooLarge


class MemoryBudget:
    """A byte-counting semaphore, first come first served (a large image is never starved by small ones)."""

    def __init__(self, capacity: int, observe: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("a memory budget needs at least one byte")
        self.capacity = capacity
        self._observe = observe or (lambda _used: None)  # the bytes reserved now, after each change
        self.used = 0
        self.peak = 0  # the most ever reserved at once: what tests and operators check against capacity
        self._cond = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()

    def acquire(self, nbytes: int, deadline: float | None = None) -> None:
        """Block until `nbytes` fit and every earlier waiter has been served; until `deadline` (monotonic)."""
        if nbytes > self.capacity:
            raise ImageTooLarge(
                f"decoding this image needs about {_mib(nbytes)} MiB; the limit is {_mib(self.capacity)} MiB"
            )
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.used + nbytes > self.capacity:
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        raise DeadlineExceeded("deadline passed while waiting for decode memory")
                    self._cond.wait(timeout)
                self.used += nbytes
                self.peak = max(self.peak, self.used)
                self._observe(self.used)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now, or is now first

    @property
    def waiting(self) -> int:
        """Decodes waiting for room now."""
        with self._cond:
            return len(self._waiting)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._observe(self.used)
            self._cond.notify_all()

    @contextmanager
    def holding(self, deadline: float | None = None) -> Iterator[Hold]:
        """A scope whose reservation (made at most once, through `Hold.reserve`) is given back at its end."""
        hold = Hold(self, deadline)
        try:
            yield hold
        finally:
            if hold.nbytes:
                self.release(hold.nbytes)


class Hold:
    """One decode's share of the budget; the decoder calls `reserve` once it knows the image's needs."""

    def __init__(self, budget: MemoryBudget, deadline: float | None) -> None:
        self._budget = budget
        self._deadline = deadline
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        if self.nbytes:
            raise RuntimeError("a hold reserves once")  # a second wait while holding could deadlock
        self._budget.acquire(nbytes, self._deadline)
        self.nbytes = nbytes

    def keep(self, nbytes: int) -> int:
        """Give back all but `nbytes` now and hand those over: the caller releases them (the views' tensor,
        reserved with the decode, stays counted until the batcher has run it). Returns the bytes kept."""
        kept = min(nbytes, self.nbytes)
        if self.nbytes > kept:
            self._budget.release(self.nbytes - kept)
        self.nbytes = 0
        return kept


class IdleTrim:
    """Gives freed memory back to the system once the service has been idle for `delay_s`.

    glibc keeps what a burst freed in its arenas (a 48-image multiscale request's tensors, the decoded
    images): the resident size stays at the burst's peak. `trim` (malloc_trim) returns it; it runs on this
    thread once `delay_s` have passed with no request answered and none outstanding (`idle()`), so no
    request pays for it. A service under steady load is never idle that long and never trims: what it has
    freed, its next requests take again, and a trim would hold the allocator's locks in the midst of them."""

    def __init__(self, delay_s: float, idle: Callable[[], bool], trim: Callable[[], None]) -> None:
        self.delay_s = delay_s
        self._idle = idle
        self._trim = trim
        self._poked = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.trims = 0

    def poke(self) -> None:
        """The last request was answered: trim after `delay_s` if nothing came meanwhile."""
        if self.delay_s <= 0 or self._stop.is_set():
            return
        self._poked.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="memory-trim", daemon=True)
                    self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()

    def _loop(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            if self._stop.wait(self.delay_s):
                return
            if self._poked.is_set():  # answered another request meanwhile: not idle all along, wait again
                continue
            if self._idle():
                self._trim()
                self.trims += 1


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f}"


def _glibc() -> Any:
    """The C library if it is glibc, else None; loaded once."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


_libc: Any = None


def return_memory() -> None:
    """Hand freed pages (a released session's, a burst's images) back to the system: glibc keeps freed
    memory in its per-thread arenas (tests/test_models_memory.py measures what it leaves behind). Elsewhere
    than glibc, nothing to do."""
    if libc := _glibc():
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BYTES = 4 << 20


def map_large_allocations() -> None:
    """Serve every allocation of LARGE_BYTES or more (an image, a batch) from pages of its own, given back
    to the system when freed. glibc's default threshold slides up to the largest block freed (32 MiB at
    most), after which such blocks come from the heap, which keeps what they free: with each image in one
    block (`service.resample`), decoding a 6 MP PNG through its conversions peaked a quarter above the
    memory the service reserves for it (tests/test_decoding_memory.py). Elsewhere than glibc, nothing."""
    if libc := _glibc():
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BYTES)


HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14


def prefer_huge_pages(address: int, length: int) -> None:
    """Ask Linux to back the whole 2 MiB pages of a fresh block with huge pages (where transparent huge pages
    are enabled for those who ask, as by default), as NumPy does for its large arrays: a block written once,
    such as a decoded image, then takes one page fault per 2 MiB instead of one per 4 KiB (docs/CORE.md).
    Elsewhere, nothing."""
    if (libc := _glibc()) is None:
        return
    start = (address + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (address + length) & ~(HUGE_PAGE - 1)
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)


def settle_heap() -> None:
    """What start-up made (the libraries' modules, the models' cards and labels) lives as long as the
    process: collected once and moved out of the collector's reach (`gc.freeze`), a full collection under
    load no longer walks it on the event loop's time. Run before the service says it is ready: this
    collection holds the interpreter lock for tens of milliseconds, which no request should wait for."""
    gc.collect()
    gc.freeze()
