"""torch's intra-op thread count for the merge: one per math worker, without touching the server's other threads.

The merge runs its math on a few worker threads of its own; each must do its torch math
single-threaded (no OpenMP barrier waiting on a busy machine), and the thread that drives the
merge must not change the count other threads of the server adopt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _in_fresh_thread(fn: Callable[[], T]) -> T:
    """Call `fn` in a new thread and return its result (torch's thread settings are per OS thread)."""
    box: list[T] = []
    thread = threading.Thread(target=lambda: box.append(fn()), name="torch-threads")
    thread.start()
    thread.join()
    if not box:
        raise RuntimeError("a torch thread-count probe failed (see the thread's traceback above)")
    return box[0]


class TorchThreads:
    """Use `n` torch threads in the calling thread only, for the duration of a `with` block.

    With ATen's OpenMP backend the thread count is per OS thread, but `torch.set_num_threads` also
    stores a process-wide default that threads created later adopt; we put that default back from
    a throwaway thread, so the server's other threads are unaffected. With another backend the
    setting is process-wide, so we leave it alone.
    """

    _openmp: bool | None = None

    def __init__(self, n: int) -> None:
        self.n = n
        self._own = 0
        self._global = 0

    @classmethod
    def supported(cls) -> bool:
        """Whether torch's thread count is per OS thread here (ATen's OpenMP backend)."""
        if cls._openmp is None:
            cls._openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
        return cls._openmp

    def __enter__(self) -> TorchThreads:
        if self.n > 0 and self.supported():
            self._own = torch.get_num_threads()  # also runs ATen's lazy per-thread initialisation first
            self._global = _in_fresh_thread(torch.get_num_threads)
            torch.set_num_threads(self.n)
            _in_fresh_thread(lambda: torch.set_num_threads(self._global))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own:
            torch.set_num_threads(self._own)
            _in_fresh_thread(lambda: torch.set_num_threads(self._global))


def pin_one_torch_thread() -> None:
    """Thread-pool initializer: this worker does its torch math single-threaded (see TorchThreads)."""
    if TorchThreads.supported():
        # get_num_threads() first: it runs ATen's lazy per-thread initialisation, which would
        # otherwise reset this thread to the process default at its first parallel op.
        torch.get_num_threads()
        default = _in_fresh_thread(torch.get_num_threads)
        torch.set_num_threads(1)
        _in_fresh_thread(lambda: torch.set_num_threads(default))
