"""Checkpoint sources: turn a reference (local path or Hub repo) into a set of safetensors files.

Local paths are confined to `KINSHIP_ALLOWED_ROOTS` after resolving symlinks, so a
request can never make the server read elsewhere. Hub repos go through
huggingface_hub's cache (honouring `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_HOME`). Only
safetensors weights are accepted: PyTorch pickles run code when loaded.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kinship_service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files fetched from the Hub besides weights: what a merge copies and what identifies a model.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "README.md"]

_CONVERT_HINT = (
    "PyTorch pickle files are refused because loading them runs arbitrary code. Convert the "
    "checkpoint first, e.g. `model = AutoModel.from_pretrained(dir); "
    "model.save_pretrained(dir, safe_serialization=True)`, or "
    "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`."
)


@dataclass(frozen=True)
class LocalPath:
    """A checkpoint on the server's disk."""

    path: str


@dataclass(frozen=True)
class HubRepo:
    """A checkpoint on the Hugging Face Hub."""

    repo_id: str
    revision: str = ""


CheckpointSpec = LocalPath | HubRepo


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: which file holds each tensor."""

    label: str
    """What the caller asked for, for messages (`/models/a` or `hf://org/repo@rev`)."""
    directory: Path
    """Directory of the checkpoint (config and tokenizer files live here)."""
    files: tuple[Path, ...]
    """The safetensors files, in a fixed order."""
    weight_map: dict[str, Path] = field(default_factory=dict, compare=False, hash=False)
    """Tensor name -> file, from the index when the checkpoint is sharded (else filled on read)."""
    revision: str = ""
    """Resolved Hub commit hash; empty for local checkpoints."""


def describe(spec: CheckpointSpec) -> str:
    """A short human label for a reference."""
    if isinstance(spec, HubRepo):
        return f"hf://{spec.repo_id}" + (f"@{spec.revision}" if spec.revision else "")
    return spec.path


# Errors that make pathlib's exists()/is_file()/is_dir() answer False instead of raising.
_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _stat_or_none(path: str, *, follow: bool = True) -> os.stat_result | None:
    """`os.stat` (or `os.lstat`), None where pathlib's is_file()/is_dir() would answer False; other errors raise."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise
    except ValueError:
        return None


_RealRoots = tuple[tuple[str, str, bool], ...]


@functools.lru_cache(maxsize=64)
def _real_roots(roots: tuple[Path | str, ...]) -> _RealRoots:
    """Each allowed root with its symlinks resolved, that path's prefix for children (`/r/`), and whether it is verified.

    Computed once per roots tuple: the roots are the server's configuration, not
    request input, so resolving them on every request would only cost syscalls.
    Verified: a strict realpath succeeded (the root exists and no symlink loop left
    part of it unresolved), so the path truly has no symlink in it and the fast
    resolution below it (`_walk_below_root`) may trust it.
    """
    out = []
    for root in roots:
        real = os.path.realpath(root)
        try:
            verified = os.path.realpath(root, strict=True) == real
        except (OSError, ValueError):
            verified = False
        out.append((real, real if real.endswith("/") else real + "/", verified))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _path(text: str) -> Path:
    """`Path(text)`, shared between requests: parsing costs microseconds and Paths are immutable."""
    return Path(text)


def _is_under(resolved: str, real_roots: _RealRoots) -> bool:
    """Whether a resolved path is one of the (resolved) roots or lies beneath one."""
    return any(resolved == real or resolved.startswith(prefix) for real, prefix, _ in real_roots)


def _denied(path: str, allowed_roots: Sequence[Path], field_name: str) -> PermissionDenied:
    if not allowed_roots:
        return PermissionDenied(
            f"{path}: this server reads no local paths; start it with KINSHIP_ALLOWED_ROOTS "
            "naming the directories that hold checkpoints",
            field=field_name,
        )
    return PermissionDenied(
        f"{path} is outside the directories this server may read "
        f"(KINSHIP_ALLOWED_ROOTS={os.pathsep.join(str(r) for r in allowed_roots)})",
        field=field_name,
    )


@functools.lru_cache(maxsize=1)
def _name_limits() -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) in bytes, from `os.pathconf("/")`; the POSIX defaults where it cannot tell."""
    try:
        return int(os.pathconf("/", "PC_NAME_MAX")), int(os.pathconf("/", "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def _too_long(path: str, field_name: str) -> InvalidArgument:
    name_max, path_max = _name_limits()
    return InvalidArgument(
        f"the checkpoint path is too long for the file system ({len(os.fsencode(path))} bytes): use names of at most "
        f"{name_max} bytes and a path of at most {path_max - 1} bytes",
        reason="PATH_TOO_LONG",
        field=field_name,
    )


@functools.lru_cache(maxsize=4096)
def _check_path_text(path: str, field_name: str) -> None:
    """INVALID_ARGUMENT for a path no file system could hold: empty, with a NUL byte, or over NAME_MAX / PATH_MAX.

    Checked on the text alone, before the allowed roots: it says nothing about the server's files.
    Memoised (the text is all it reads; errors are raised afresh each time, never cached): light
    calls name the same few checkpoints over and over.
    """
    if not path:
        raise InvalidArgument("the checkpoint path is empty", field=field_name)
    if "\x00" in path:
        raise InvalidArgument("the checkpoint path contains a NUL byte", field=field_name)
    name_max, path_max = _name_limits()
    try:
        encoded = os.fsencode(os.path.expanduser(path))
    except UnicodeError:
        raise InvalidArgument("the checkpoint path is not valid text for a file name", field=field_name) from None
    if len(encoded) >= path_max or any(len(part) > name_max for part in encoded.split(b"/")):
        raise _too_long(path, field_name)


def check_allowed(path: str, allowed_roots: Sequence[Path], field_name: str) -> Path:
    """Resolve `path` (following symlinks) and insist it lies under an allowed root.

    Raises PermissionDenied before looking at whether the path exists, so requests
    cannot probe the server's file system outside the roots. The path is resolved
    afresh on every call; only the roots' own resolution is cached (`_real_roots`).
    """
    _check_path_text(path, field_name)
    resolved = os.path.realpath(os.path.expanduser(path))
    if _is_under(resolved, _real_roots(tuple(allowed_roots))):
        return Path(resolved)
    raise _denied(path, allowed_roots, field_name)


def _walk_below_root(path: str, real_roots: _RealRoots) -> tuple[str, os.stat_result] | None:
    """The fast, common case of resolving a request path: it is spelled below a verified resolved root.

    `lstat` each component below the root; when none is a symlink (and none is `..`),
    the path already is its own real path, inside that root, and the last `lstat` is
    its `stat`. Returns None (the caller then takes the general route: realpath,
    root check, stat) on a symlink, a `..`, an error, or a path not spelled below a root.
    """
    for real, prefix, verified in real_roots:
        if not verified:
            continue
        if path == real:
            rest = ""
        elif path.startswith(prefix):
            rest = path[len(prefix):]
        else:
            continue
        current = real.rstrip("/")
        st: os.stat_result | None = None
        for part in rest.split("/"):
            if not part or part == ".":
                continue
            if part == "..":
                return None
            current = current + "/" + part
            try:
                st = os.lstat(current)
            except (OSError, ValueError):
                return None
            if stat.S_ISLNK(st.st_mode):
                return None
        if st is None:  # the root itself
            current = real
            try:
                st = os.stat(real)
            except (OSError, ValueError):
                return None
        return current, st
    return None


def _locate(path: str, allowed_roots: Sequence[Path], field_name: str) -> tuple[str, os.stat_result | None, bool]:
    """`check_allowed` plus the resolved path's stat (None when it does not exist), in as few syscalls as may be.

    The flag says whether the resolved path is verified free of symlinks (the fast
    route). A realpath is not always: on a symlink loop it gives up and returns a
    lexically normalised path, whose components may still be links.
    PermissionDenied comes before any look at whether the path exists.
    """
    _check_path_text(path, field_name)
    expanded = os.path.expanduser(path)
    real_roots = _real_roots(tuple(allowed_roots))
    found = _walk_below_root(expanded, real_roots)
    if found is not None:
        return found[0], found[1], True
    resolved = os.path.realpath(expanded)
    if not _is_under(resolved, real_roots):
        raise _denied(path, allowed_roots, field_name)
    return resolved, _stat_or_none(resolved), False


def resolve(spec: CheckpointSpec, allowed_roots: Sequence[Path], field_name: str = "checkpoint") -> Checkpoint:
    """Resolve a reference into its safetensors files, or raise a KinshipError saying why not."""
    return resolve_with_stats(spec, allowed_roots, field_name)[0]


def resolve_with_stats(
    spec: CheckpointSpec, allowed_roots: Sequence[Path], field_name: str = "checkpoint"
) -> tuple[Checkpoint, tuple[os.stat_result | None, ...]]:
    """`resolve`, plus per weight file the `os.stat` result taken while resolving it.

    The stats let a caller (checkpoint identity) skip stating the files again in the
    same request. An entry is None where no stat was taken (Hub files, symlinked
    shards): stat those yourself.
    """
    if isinstance(spec, HubRepo):
        checkpoint = _resolve_hub(spec, field_name)
        return checkpoint, (None,) * len(checkpoint.files)
    try:
        return _resolve_local_spec(spec, allowed_roots, field_name)
    except OSError as exc:
        # A path within the limits can still exceed them once symlinks are expanded or a file name appended.
        if exc.errno == errno.ENAMETOOLONG:
            raise _too_long(spec.path, field_name) from None
        raise


def _resolve_local_spec(
    spec: LocalPath, allowed_roots: Sequence[Path], field_name: str
) -> tuple[Checkpoint, tuple[os.stat_result | None, ...]]:
    resolved, st, verified = _locate(spec.path, allowed_roots, field_name)
    if st is None:
        raise NotFound(f"{spec.path} does not exist", reason="CHECKPOINT_NOT_FOUND", field=field_name)
    checkpoint, seen = _resolve_local(_path(resolved), spec.path, field_name, allowed_roots, st=st)
    # When `resolved` is verified real, so is checkpoint.directory (`resolved` or its parent).
    directory = str(checkpoint.directory) if verified else None
    stats: list[os.stat_result | None] = []
    for file in checkpoint.files:  # a shard may be a symlink leading out of the roots
        name = str(file)
        if directory is not None and os.path.dirname(name) == directory:
            lst = seen.get(name)
            if lst is None:
                try:
                    lst = os.lstat(name)
                except (OSError, ValueError):
                    lst = None  # check_allowed below decides, as for any other file
            if lst is not None and stat.S_ISREG(lst.st_mode):
                # A regular file (not a symlink) directly in a resolved directory: its own real path, inside.
                stats.append(lst)
                continue
        check_allowed(name, allowed_roots, field_name)
        stats.append(None)
    return checkpoint, tuple(stats)


def _regular_file(path: str, allowed_roots: Sequence[Path], field_name: str) -> tuple[bool, os.stat_result | None]:
    """(is it a regular file, following symlinks; its lstat when it is one and not a symlink).

    A symlink is resolved and checked against the allowed roots first, whatever it points
    at (a device such as /dev/zero, a directory, nothing): PermissionDenied when it leads
    outside, so a link can neither make the server open a device nor probe what exists
    outside the roots.
    """
    lst = _stat_or_none(path, follow=False)
    if lst is None:
        return False, None
    if stat.S_ISREG(lst.st_mode):
        return True, lst
    if stat.S_ISLNK(lst.st_mode):
        target = _stat_or_none(str(check_allowed(path, allowed_roots, field_name)))
        return target is not None and stat.S_ISREG(target.st_mode), None
    return False, None


def _resolve_local(
    path: Path,
    label: str,
    field_name: str,
    allowed_roots: Sequence[Path],
    revision: str = "",
    st: os.stat_result | None = None,
) -> tuple[Checkpoint, dict[str, os.stat_result]]:
    """The checkpoint at `path` (a file or a directory; `st`: its stat if already taken).

    Every symlink in the directory that is looked at (index, weight files) must lead
    inside `allowed_roots`. Also returns the `lstat` results, by path, of the weight
    files found to be regular files that are not symlinks.
    """
    text = str(path)
    if st is None:
        st = _stat_or_none(text)
    if st is not None and stat.S_ISREG(st.st_mode):
        if path.suffix in PICKLE_SUFFIXES:
            raise FailedPrecondition(f"{label} is a PyTorch pickle. {_CONVERT_HINT}", reason="PICKLE_REFUSED", field=field_name)
        if path.suffix != ".safetensors":
            raise InvalidArgument(f"{label} is not a .safetensors file", reason="NOT_SAFETENSORS", field=field_name)
        return Checkpoint(label=label, directory=path.parent, files=(path,), revision=revision), {}
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{label} is neither a file nor a directory", reason="NOT_SAFETENSORS", field=field_name)
    index_is_file, _ = _regular_file(os.path.join(text, INDEX_FILE), allowed_roots, field_name)
    if index_is_file:
        return _from_index(path, path / INDEX_FILE, label, field_name, allowed_roots, revision)
    single = os.path.join(text, SINGLE_FILE)
    is_file, lst = _regular_file(single, allowed_roots, field_name)
    if is_file:
        checkpoint = Checkpoint(label=label, directory=path, files=(_path(single),), revision=revision)
        return checkpoint, ({single: lst} if lst is not None else {})
    shards = sorted(p for p in path.glob("*.safetensors") if _regular_file(str(p), allowed_roots, field_name)[0])
    if shards:
        return Checkpoint(label=label, directory=path, files=tuple(shards), revision=revision), {}
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise FailedPrecondition(
            f"{label} holds only PyTorch pickle weights. {_CONVERT_HINT}", reason="PICKLE_REFUSED", field=field_name
        )
    raise FailedPrecondition(f"{label} holds no .safetensors files", reason="NO_SAFETENSORS", field=field_name)


def _from_index(
    directory: Path, index: Path, label: str, field_name: str, allowed_roots: Sequence[Path], revision: str
) -> tuple[Checkpoint, dict[str, os.stat_result]]:
    """The checkpoint an index describes, and the `lstat` results of its shards that are regular files, not symlinks.

    Each distinct shard is checked once, however many tensors the index places in it.
    """
    try:
        weight_map_raw = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map_raw, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's stack (a hostile or broken index).
        detail = "its JSON is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FailedPrecondition(
            f"{index} is not a valid safetensors index ({detail}); it needs a `weight_map` object",
            reason="BAD_INDEX",
            field=field_name,
        ) from None
    weight_map: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    seen: dict[str, os.stat_result] = {}
    for name, shard in weight_map_raw.items():
        shard_text = str(shard)
        shard_path = checked.get(shard_text)
        if shard_path is None:
            # Lexical check here; where a symlinked shard leads is checked against the allowed roots next.
            shard_path = Path(os.path.normpath(directory / shard_text))
            if not shard_path.is_relative_to(directory) or "\x00" in shard_text:
                raise PermissionDenied(f"{index} points outside its directory: {shard}", field=field_name)
            try:
                is_file, lst = _regular_file(str(shard_path), allowed_roots, field_name)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                is_file, lst = False, None  # a name too long for the file system names no file
            if not is_file:
                raise FailedPrecondition(
                    f"{index} lists {shard} for tensor {name}, but that file is missing", reason="SHARD_MISSING", field=field_name
                )
            if lst is not None:
                seen[str(shard_path)] = lst
            checked[shard_text] = shard_path
        weight_map[name] = shard_path
    files = tuple(sorted(set(weight_map.values())))
    if not files:
        raise FailedPrecondition(f"{index} lists no tensors", reason="BAD_INDEX", field=field_name)
    return Checkpoint(label=label, directory=directory, files=files, weight_map=weight_map, revision=revision), seen


def _resolve_hub(spec: HubRepo, field_name: str) -> Checkpoint:
    # Imported here: huggingface_hub reads HF_* variables at import, and tests set them per case.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = describe(spec)
    if not spec.repo_id or "\x00" in spec.repo_id or ".." in spec.repo_id or spec.repo_id.startswith("/"):
        raise InvalidArgument(f"{spec.repo_id!r} is not a Hub repo id (use owner/name)", field=f"{field_name}.hub.repo_id")
    try:
        folder = snapshot_download(
            repo_id=spec.repo_id,
            revision=spec.revision or None,
            allow_patterns=HUB_PATTERNS,
        )
    except GatedRepoError:
        raise PermissionDenied(
            f"{label} is gated; give the server an HF_TOKEN with access", reason="HUB_GATED", field=field_name
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only repos already in the Hub cache resolve)" if offline else ""
        raise NotFound(f"{label} not found{hint}: {type(exc).__name__}", reason="HUB_NOT_FOUND", field=field_name) from None
    except ValueError as exc:  # huggingface_hub's validators raise HFValidationError(ValueError)
        raise InvalidArgument(f"{label}: {exc}", field=f"{field_name}.hub.repo_id") from None
    except (HfHubHTTPError, OSError) as exc:
        raise Unavailable(f"{label}: the Hub could not be reached ({exc}); retry later", reason="HUB_UNAVAILABLE") from None
    folder_path = Path(folder)
    revision = folder_path.name  # snapshots/<commit hash>
    repo_cache = folder_path.parent.parent  # models--owner--name: snapshots link to its blobs
    checkpoint, _ = _resolve_local(folder_path, label, field_name, [repo_cache], revision=revision)
    for file in checkpoint.files:
        check_allowed(str(file), [repo_cache], field_name)
    return checkpoint
