"""Mapped reads of tensor ranges (`checkpoints.mapped`): a file that shrinks under a live map is an error, not a dead process.

Real files, real maps, real SIGBUS: the reads here are `ctypes.string_at` (a memcpy in this
thread) and the fused kernel's compiled loops (threads without the GIL).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

from kinship_service.checkpoints import mapped  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mapped reads are for 64-bit Linux")


def test_a_page_lost_to_truncation_reads_as_zeros_and_is_reported(tmp_path: Path) -> None:
    assert mapped.guard(), mapped._state["error"]
    target = tmp_path / "data.bin"
    target.write_bytes(b"\x01" * (1 << 20))
    fd = os.open(target, os.O_RDONLY)
    try:
        offset, length = 12_345, (1 << 20) - 12_345  # not page-aligned: the map starts at the page before
        with mapped.MappedRows([fd], [offset], length) as rows:
            assert ctypes.string_at(rows.addresses[0], length) == b"\x01" * length
            assert rows.faulted() == []
            os.truncate(target, 1 << 18)  # the last 3/4 of the range are gone
            data = ctypes.string_at(rows.addresses[0], length)  # faults on each lost page: the guard maps zeros
            assert rows.faulted() == [0]
        kept = (1 << 18) - offset
        assert data[:kept] == b"\x01" * kept and data[kept:] == bytes(length - kept)
        with mapped.MappedRows([fd], [0], 4096) as rows:  # the slot was freed and is clean again
            assert rows.faulted() == []
    finally:
        os.close(fd)


def test_a_sigbus_outside_every_window_still_ends_the_process(tmp_path: Path) -> None:
    """The guard answers only for its own windows: any other SIGBUS is fatal, as it is without it."""
    code = textwrap.dedent(
        f"""
        import mmap, os
        from kinship_service.checkpoints import mapped
        assert mapped.guard()
        path = {str(tmp_path / "other.bin")!r}
        open(path, "wb").write(b"x" * 8192)
        handle = open(path, "rb")
        other = mmap.mmap(handle.fileno(), 8192, prot=mmap.PROT_READ)  # not a MappedRows window
        os.truncate(path, 10)
        print("reading", flush=True)
        print(other[5000])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "reading", result.stderr
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr[-2000:])


def test_the_guard_comes_back_after_faulthandler_replaced_it(tmp_path: Path) -> None:
    import faulthandler

    assert mapped.guard()
    enabled = faulthandler.is_enabled()
    faulthandler.enable()  # installs its own SIGBUS handler over ours
    try:
        target = tmp_path / "data.bin"
        target.write_bytes(b"\x02" * 65_536)
        fd = os.open(target, os.O_RDONLY)
        try:
            with mapped.MappedRows([fd], [0], 65_536) as rows:  # puts ours back
                os.truncate(target, 4096)
                assert ctypes.string_at(rows.addresses[0] + 8192, 16) == bytes(16)
                assert rows.faulted() == [0]
        finally:
            os.close(fd)
    finally:
        if not enabled:
            faulthandler.disable()


def test_the_setting_turns_mapped_reads_off_and_names_itself_when_wrong() -> None:
    from kinship_service.config import ConfigError, Settings

    assert Settings.from_env({}).mapped_reads is True
    assert Settings.from_env({"KINSHIP_MAPPED_READS": "false"}).mapped_reads is False
    with pytest.raises(ConfigError, match="KINSHIP_MAPPED_READS"):
        Settings.from_env({"KINSHIP_MAPPED_READS": "sometimes"})
    try:
        mapped.configure(False)
        assert not mapped.available()  # the fused kernel then reads with pread
    finally:
        mapped.configure(True)
    assert mapped.available()


def test_a_file_the_system_cannot_map_is_left_to_pread() -> None:
    """A descriptor mmap refuses (here a pipe: ENODEV, as on a file system without mmap) gives None, not an error."""
    assert mapped.guard()
    read_end, write_end = os.pipe()
    try:
        assert mapped.map_rows([read_end], [0], 4096) is None
        with mapped.MappedRows([], [], 0) as rows:  # nothing mapped, nothing held
            assert rows.faulted() == []
    finally:
        os.close(read_end)
        os.close(write_end)
    free_before = len(mapped._free)
    assert mapped.map_rows([read_end], [0], 4096) is None  # a closed descriptor (EBADF) too
    assert len(mapped._free) == free_before  # no window slot left behind


def test_an_exact_pass_leaves_no_checkpoint_mapped(tmp_path: Path) -> None:
    """Chunks are unmapped one chunk late (while the next one computes) and the last when the pass ends."""
    import torch
    from safetensors.torch import save_file

    from kinship_service.checkpoints.sources import LocalPath, resolve
    from kinship_service.kinship.exact import exact_kinship

    generator = torch.Generator().manual_seed(3)
    base = {f"w{i}": torch.randn(256, 256, generator=generator).to(torch.bfloat16) for i in range(3)}
    dirs = []
    for name, scale in (("base", 0.0), ("m0", 0.01), ("m1", 0.02)):
        folder = tmp_path / name
        folder.mkdir()
        tensors = {k: (v.float() + scale * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors if scale else base, str(folder / "model.safetensors"))
        dirs.append(folder)
    checkpoints = [resolve(LocalPath(str(d)), [tmp_path]) for d in dirs]
    free_before = len(mapped._free)
    result = exact_kinship(checkpoints[0], checkpoints[1:])
    assert result.overall.cosine[0][1] > 0
    mapped_files = Path("/proc/self/maps").read_text()
    assert str(tmp_path) not in mapped_files, "a checkpoint is still mapped after the pass"
    assert len(mapped._free) == free_before  # every window slot given back


def test_the_reason_mapped_reads_are_off_is_told() -> None:
    assert mapped.unavailable_reason() == ""
    try:
        mapped.configure(False)
        assert mapped.unavailable_reason() == "KINSHIP_MAPPED_READS is false"
    finally:
        mapped.configure(True)
