"""Where a merge writes and how it becomes visible: output paths under the root, fsynced files, the atomic publish.

Everything goes into a temporary directory next to the output, each file fsynced, then the
directory is fsynced and renamed into place: a failed, cancelled or killed merge never leaves a
directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kinship_service.errors import AlreadyExists, InvalidArgument, PermissionDenied

TMP_PREFIX = ".kinship-tmp-"
TRASH_PREFIX = ".kinship-trash-"


def resolve_output_dir(output_root: Path, output_path: str) -> Path:
    """The absolute output directory for a request's `output_path`, confined to the output root.

    Relative paths are taken under the root; an absolute path is accepted only when it lies under
    the root. Symlinks are resolved first, so none can lead outside. The root itself is refused.
    """
    if not output_path:
        raise InvalidArgument("output_path is required: a directory name under the server's output root", field="output_path")
    if "\x00" in output_path:
        raise InvalidArgument("output_path contains a NUL byte", field="output_path")
    if len(os.fsencode(output_path)) > 4000 or any(len(os.fsencode(p)) > 255 for p in Path(output_path).parts):
        raise InvalidArgument(
            "output_path is too long: use directory names of at most 255 bytes and a path of at most 4000 bytes",
            reason="PATH_TOO_LONG",
            field="output_path",
        )
    root = Path(os.path.realpath(output_root))
    target = Path(os.path.realpath(root / os.path.expanduser(output_path)))
    if target == root or not target.is_relative_to(root):
        raise PermissionDenied(
            f"output_path {output_path!r} leaves the output root; give a directory name under it "
            f"(KINSHIP_OUTPUT_ROOT={output_root})",
            field="output_path",
        )
    if any(part.startswith((TMP_PREFIX, TRASH_PREFIX)) for part in target.relative_to(root).parts):
        raise InvalidArgument(f"output_path may not use the reserved prefixes {TMP_PREFIX} or {TRASH_PREFIX}", field="output_path")
    return target


def temp_dir_for(final_dir: Path, job_id: str) -> Path:
    """Where a job writes before the rename: a hidden sibling of the output (same file system)."""
    return final_dir.parent / f"{TMP_PREFIX}{job_id}"


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (best effort for cleanup)."""
    shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_file(path: Path, data: object) -> None:
    """Create `path` (it must not exist) holding `data` as indented JSON, fsynced."""
    write_bytes_file(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Rename the finished `tmp_dir` to `final_dir`; an existing output is replaced only with `overwrite`.

    The old output is first renamed aside (to a trash name) and removed after the new one is in
    place, so `final_dir` is at every moment either the old complete output or the new one.
    """
    trash: Path | None = None
    if final_dir.exists() or final_dir.is_symlink():
        if not overwrite:
            raise AlreadyExists(f"{final_dir} appeared while merging; set overwrite to replace it", reason="OUTPUT_EXISTS", field="output_path")
        trash = final_dir.parent / f"{TRASH_PREFIX}{tmp_dir.name.removeprefix(TMP_PREFIX)}"
        os.rename(final_dir, trash)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            remove_tree(trash)
        else:
            trash.unlink(missing_ok=True)
