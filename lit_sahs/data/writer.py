"""BlockWriter: commits store blocks on a background thread, off the extraction's critical path.

The extraction loop hands each full block (index rows, activation tensors, extras) to `submit`
and goes on with the next forward; one writer thread concatenates, converts to float16 numpy,
writes the zarr block, seals its checksums and renames it into place (``ActivationStore.write_block``,
so every block is still one atomic commit: a failure removes its temp directory and no half
block is ever visible).

The queue is bounded (`max_pending` blocks): when the disk is slower than the forward the loop
waits instead of holding an unbounded number of blocks in memory. The first error of the thread
is kept and raised in the caller's thread, as a LitSahsError naming the store, at the next
`submit`, `check` or `close`; blocks queued after a failure of the writer are dropped (never written), so a
failed run ends with only whole blocks that precede the failure, and a re-run writes the rest.
When the loop itself fails, `abort` still commits the (at most `max_pending`) complete blocks queued.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Optional, Sequence

from lit_sahs.errors import LitSahsError

_STOP = object()


def _cat(parts: list) -> Any:
    if len(parts) == 1:
        return parts[0]
    if hasattr(parts[0], "detach"):
        import torch

        return torch.cat(parts)
    import numpy as np

    return np.concatenate(parts)


class BlockWriter:
    """Commits blocks to `store` (an ActivationStore) from one background thread.

    `submit(rows, [activation parts], rank, {name: [parts]})` queues a block (the parts are
    concatenated on the writer thread); `close()` waits for every queued block and raises the
    thread's error, if any; `abort()` does the same without raising (the caller is already failing)."""

    def __init__(self, store, max_pending: int = 2, tag: str = ""):
        if max_pending < 1:
            raise LitSahsError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.tag = tag  # ActivationStore.write_block's block-name tag
        self.rows_written = 0
        self.blocks_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="lit_sahs-block-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side
    def submit(self, rows: Sequence[dict], activations: list, rank: int = 0,
               extras: Optional[dict[str, list]] = None) -> None:
        self.check()
        if not self._thread.is_alive():
            raise LitSahsError(f"the block writer of activation store {self.store.path} is closed")
        item = (list(rows), list(activations), rank, dict(extras or {}))
        while True:  # bounded: wait for room, but notice a writer that died meanwhile
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self.check()

    def check(self) -> None:
        """Raise the writer thread's error (once it has one) in the calling thread."""
        e = self._error
        if e is not None:
            if isinstance(e, LitSahsError):
                raise LitSahsError(f"writing activation store {self.store.path} failed: {e}") from e
            raise LitSahsError(f"writing activation store {self.store.path} failed: {type(e).__name__}: {e}; "
                               "committed blocks are whole, re-run extract to write the rest") from e

    def close(self) -> None:
        """Wait until every queued block is committed; raise the writer's error if it had one."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self.check()

    def abort(self) -> None:
        """The caller is failing (an error or interrupt elsewhere): commit the blocks already queued
        (at most `max_pending`, each whole; a re-run then skips their rows) and stop; never raises."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    # ---------------------------------------------------------------- writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written: drain until stopped
            rows, acts, rank, extras = item
            try:
                extras = {k: _cat(v) for k, v in extras.items()}
                if self.store.write_block(rows, _cat(acts), rank=rank, extras=extras, tag=self.tag):
                    self.rows_written += len(rows)
                    self.blocks_written += 1
            except BaseException as e:  # noqa: BLE001 - surfaced in the caller's thread by check()
                self._error = e
