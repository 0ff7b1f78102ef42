"""Host work beside the device: a chunk's outputs (PNG encoding, hashing, file writes: ``RunStore.write_chunk``)
are written by one worker thread while the next chunk computes (issue 15, item 3).

At most ``depth`` chunks wait to be written (a bounded queue: a submit first waits for the oldest write), so memory
stays bounded when writing is slower than computing. Writes run in submission order, one at a time, so the store
sees exactly the calls it saw in series; a failed write re-raises in the caller at the next submit or at exit.
Leaving the block (normally or by an exception, Ctrl-C included) waits for every pending write: a chunk that was
computed is committed, so a resumed run skips it. PIL's PNG encoder, zlib and hashlib release the GIL, and so do
torch's ops, so the two threads overlap on two cores.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class BackgroundWriter:
    """``with BackgroundWriter(write) as w: w.submit(*args)`` calls ``write(*args)`` on a worker thread.
    ``enabled=False`` calls it in series instead (the baseline a benchmark compares with)."""

    def __init__(self, write: Callable[..., None], depth: int = 1, enabled: bool = True):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1 (chunks waiting to be written)")
        self.write, self.depth, self.enabled = write, depth, enabled
        self._pending: deque[Future] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BackgroundWriter:
        if self.enabled:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ospo-writer")
        return self

    def submit(self, *args) -> None:
        if self._pool is None:
            self.write(*args)
            return
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self.write, *args))

    def __exit__(self, *exc) -> None:
        if self._pool is None:
            return
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
