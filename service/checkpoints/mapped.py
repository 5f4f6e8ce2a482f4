"""Read-only memory maps of tensor byte ranges for the fused kernel: no copy, and a file that shrinks is an error, not a crash.

The fused kernel used to `pread` every piece into cache-sized buffers; on AMD EPYC (2 cores) that
copy from the page cache cost as much CPU as the whole read floor (0.37 of the exact pass's
1.3 CPU-seconds). Mapped, the kernel reads the page-cache pages in place.

A map has one hazard a read has not: a file truncated while mapped faults (SIGBUS) where its pages
went, and SIGBUS kills the process. `guard()` installs a SIGBUS handler, compiled with numba (a
handler must be native code: it runs in the faulting kernel thread, without the GIL), that, for a
fault inside a live window, maps a page of zeros over the lost page, marks the window and returns;
`MappedRows` then checks the marks and the files' sizes once the kernel is done, so the pass
answers FAILED_PRECONDITION `CHECKPOINT_CHANGED` as a short `pread` does. A fault anywhere else
restores SIGBUS's default action and returns: the access faults again and ends the process, as an
unhandled SIGBUS does (faulthandler's traceback, if it was enabled, is not printed then).
Where the guard cannot be installed (not 64-bit Linux, no numba), or with `KINSHIP_MAPPED_READS=false`
(`configure`), `available()` is False and the kernel keeps reading with `pread`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

_SLOTS = 1024
"""Windows that can be live at once in one process (a pass maps one per checkpoint per chunk)."""
_BUS_ADRERR = 2  # si_code of an access to a page beyond the end of a mapped file
_PAGE = mmap.PAGESIZE
_PROT_READ, _MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x1, 0x01, 0x02, 0x10, 0x20
_SA_SIGINFO = 4
_MAP_FAILED = 2**64 - 1

# [lo, hi, faults] per slot: read by the handler from its fixed address, so never reallocated.
_windows = np.zeros((_SLOTS, 3), dtype=np.int64)
_default_action = ctypes.create_string_buffer(256)  # struct sigaction of SIG_DFL (all zeros)
_lock = threading.Lock()
_free = list(range(_SLOTS - 1, -1, -1))
_state: dict[str, Any] = {"installed": None, "error": "", "enabled": True}


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_size_t
    libc.munmap.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t]
    libc.sigaction.restype = ctypes.c_int
    return libc


def _compile_handler(libc: Any) -> Any:
    """The SIGBUS handler as a numba cfunc: `void(int signo, siginfo_t *info, void *context)`."""
    from llvmlite import ir
    from numba import cfunc, types
    from numba.extending import intrinsic

    def loader(bits: int) -> Any:
        def typing(typingctx: Any, address: Any) -> Any:
            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                value = builder.load(builder.inttoptr(args[0], ir.IntType(bits).as_pointer()))
                return builder.sext(value, ir.IntType(64)) if bits < 64 else value

            return types.int64(types.int64), codegen

        return intrinsic(typing)

    load32, load64 = loader(32), loader(64)  # the integer of that many bits at an address, as int64

    def store_typing(typingctx: Any, address: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            builder.store(args[1], builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    store: Any = intrinsic(store_typing)  # write an int64 at an address

    map_pages, sigaction = libc.mmap, libc.sigaction
    windows, slots, default = int(_windows.ctypes.data), _SLOTS, ctypes.addressof(_default_action)
    zero_flags = _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS
    page_mask = ~(_PAGE - 1)
    bus, adrerr, prot, failed = int(signal.SIGBUS), _BUS_ADRERR, _PROT_READ, _MAP_FAILED

    @cfunc(types.void(types.int32, types.int64, types.int64))
    def on_sigbus(signo: int, info: int, context: int) -> None:  # pragma: no cover - runs as a signal handler
        code = load32(info + 8)
        address = load64(info + 16)
        if code == adrerr:
            for slot in range(slots):
                entry = windows + slot * 24
                if load64(entry) <= address < load64(entry + 8):
                    if map_pages(address & page_mask, _PAGE, prot, zero_flags, -1, 0) == failed:
                        break  # no page of zeros to be had: returning would fault again forever
                    store(entry + 16, load64(entry + 16) + 1)
                    return
        sigaction(bus, default, 0)  # not ours: the re-executed access ends the process, as SIGBUS does by default

    return on_sigbus


def guard() -> bool:
    """Install the SIGBUS handler once per process; whether mapped reads are safe here (else use `pread`)."""
    with _lock:
        if _state["installed"] is None:
            _state["installed"] = _install()
        return bool(_state["installed"])


def configure(enabled: bool) -> None:
    """Settings.mapped_reads (`KINSHIP_MAPPED_READS`): False makes `available()` False, so the kernel reads with `pread`."""
    with _lock:
        _state["enabled"] = enabled


def _install() -> bool:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        _state["error"] = "mapped reads need 64-bit Linux"
        return False
    try:
        libc = _libc()
        handler = _compile_handler(libc)
    except Exception as exc:  # numba missing or unable to compile: pread instead
        _state["error"] = f"the SIGBUS handler could not be built ({type(exc).__name__}: {exc})"
        return False
    _state["handler"] = handler  # kept alive: the kernel calls its address
    if not _install_handler(libc, handler):
        return False
    _state["libc"] = libc
    return True


def _install_handler(libc: Any, handler: Any) -> bool:
    action = ctypes.create_string_buffer(256)  # struct sigaction: handler, mask (128 bytes), flags
    ctypes.c_size_t.from_buffer(action, 0).value = handler.address
    ctypes.c_int.from_buffer(action, 8 + 128).value = _SA_SIGINFO
    if libc.sigaction(int(signal.SIGBUS), ctypes.addressof(action), 0) != 0:
        _state["error"] = f"sigaction failed: {os.strerror(ctypes.get_errno())}"
        return False
    return True


def _keep_installed() -> None:
    """Install the handler again if something replaced it since (faulthandler.enable(), say)."""
    libc, handler = _state["libc"], _state["handler"]
    current = ctypes.create_string_buffer(256)
    libc.sigaction(int(signal.SIGBUS), 0, ctypes.addressof(current))
    if ctypes.c_size_t.from_buffer(current, 0).value != handler.address:
        with _lock:
            _install_handler(libc, handler)


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True), for the start-up log."""
    if not _state["enabled"]:
        return "KINSHIP_MAPPED_READS is false"
    return "" if guard() else str(_state["error"])


def available() -> bool:
    """Whether the fused kernel should map (`configure`d on, and the guard installed or installable)."""
    return not unavailable_reason()


class MappedRows:
    """Map byte ranges of open files read-only for the length of a `with` block; `addresses` are where each range starts.

    `faulted()`, once the kernel ran and before the block ends, says which ranges the SIGBUS guard
    filled with zeros (their file shrank under the kernel); the caller also checks the files' sizes.
    """

    def __init__(self, fds: Sequence[int], offsets: Sequence[int], length: int, defer_unmap: bool = False) -> None:
        """`defer_unmap`: leaving the block unregisters the windows but leaves the unmapping to this
        thread's next `unmap_deferred()` (see there)."""
        if not guard():
            raise RuntimeError(f"mapped reads are unavailable: {_state['error']}")
        _keep_installed()
        self._fds, self._offsets, self._length = list(fds), list(offsets), length
        self._defer = defer_unmap
        self._maps: list[tuple[int, int]] = []
        self._slots: list[int] = []
        self.addresses: list[int] = []

    def __enter__(self) -> MappedRows:
        if self.addresses:  # already mapped (`map_rows`)
            return self
        libc = _state["libc"]
        try:
            for fd, offset in zip(self._fds, self._offsets, strict=True):
                aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
                size = offset - aligned + self._length
                base = libc.mmap(0, size, _PROT_READ, _MAP_SHARED, fd, aligned)
                if base == _MAP_FAILED:
                    raise OSError(ctypes.get_errno(), f"mmap failed: {os.strerror(ctypes.get_errno())}")
                self._maps.append((base, size))
                self._slots.append(self._register(base, base + size))
                self.addresses.append(base + offset - aligned)
        except BaseException:
            self._defer = False  # nothing was read from these: unmap them now
            self.__exit__(None, None, None)
            raise
        return self

    @staticmethod
    def _register(lo: int, hi: int) -> int:
        with _lock:
            if not _free:
                raise RuntimeError(f"more than {_SLOTS} mapped windows at once")
            slot = _free.pop()
        _windows[slot, 2] = 0
        _windows[slot, 0] = lo  # lo first: [lo, 0) is empty until hi is written
        _windows[slot, 1] = hi
        return slot

    def faulted(self) -> list[int]:
        """Indices of the ranges whose pages the guard replaced with zeros (their file shrank under the kernel)."""
        return [i for i, slot in enumerate(self._slots) if _windows[slot, 2]]

    def __exit__(self, *exc: object) -> None:
        libc = _state["libc"]
        for slot in self._slots:
            _windows[slot, 1] = 0
            _windows[slot, 0] = 0
            with _lock:
                _free.append(slot)
        maps, self._maps, self._slots = self._maps, [], []
        if self._defer:
            unmap_deferred()  # at most one block's maps wait
            _deferred.maps = maps
            return
        for base, size in maps:
            libc.munmap(base, size)


_deferred = threading.local()


def unmap_deferred() -> None:
    """Unmap what this thread's last `MappedRows(defer_unmap=True)` block left mapped.

    Tearing down a chunk's page tables (about 1 ms per 12 MiB on AMD EPYC) on the thread that
    drives the kernel left the kernel's other threads idle; deferred, it runs on that thread while
    the others already work on the next chunk. Call it when the pass ends (a file stays open while
    mapped, and its pages count in the RSS).
    """
    maps = getattr(_deferred, "maps", None)
    if maps:
        _deferred.maps = None
        libc = _state["libc"]
        for base, size in maps:
            libc.munmap(base, size)


def map_rows(fds: Sequence[int], offsets: Sequence[int], length: int, defer_unmap: bool = False) -> MappedRows | None:
    """`MappedRows` already mapped, or None when the system refuses the map (a file system without
    mmap, no address space left): the caller then reads with `pread`. Use it in a `with` block."""
    rows = MappedRows(fds, offsets, length, defer_unmap)
    try:
        return rows.__enter__()
    except OSError:
        return None
