"""The one safetensors header reader: read and validate each file's header once per file state.

Every part that needs a checkpoint's layout takes what this module returns: identity hashing
(the header digest), the kinship plan and the streaming reader (the tensor entries), the merge
(data start and per-tensor byte offsets). The checks are exactly safetensors' own (0.8), so a
file is accepted here if and only if `safetensors.safe_open` accepts it:

- the 8-byte little-endian header length N is at most 100,000,000 and 8 + N fits in the file;
- the header is UTF-8 JSON (no NaN/Infinity, no number out of float range, no lone
  surrogate, nesting at most 127 deep), an object whose `__metadata__` (once at most) is null
  or a str -> str map and whose every other value is a tensor entry: a known dtype, a shape of
  non-negative integers, `data_offsets` of two non-negative integers (each field once);
- sorted by offsets, the tensors are contiguous from 0 (no gap, no overlap), each span equals
  prod(shape) x dtype size (no overflow of 64 bits, sub-byte dtypes ending on a byte), and the
  data section ends exactly at the end of the file (nothing trailing, nothing missing).

A file that fails is `FAILED_PRECONDITION CORRUPT_SAFETENSORS` naming the file, its checkpoint
and what is wrong. Parsed headers are memoised on the file's `stat` (path, size, inode, mtime,
ctime), so a file is parsed again only when it changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kinship_service.checkpoints.dtypes import FLOATING, SAFETENSORS_DTYPES, tensor_nbytes
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.errors import FailedPrecondition

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
MAX_JSON_DEPTH = 127  # serde_json's recursion limit (128) allows 127 nested containers
_U64_MAX = 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class FileState:
    """What `stat` says about one weight file."""

    path: str
    size: int
    inode: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: Path, st: os.stat_result | None = None) -> FileState:
    """The FileState of `path`: from `st` when the caller has just stat-ed it, else a fresh `os.stat`."""
    if st is None:
        st = os.stat(path)
    return FileState(str(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry."""

    name: str
    dtype: str
    """safetensors dtype name, e.g. `BF16`."""
    shape: tuple[int, ...]
    file: Path
    begin: int = -1
    """Absolute file offset of the tensor's first byte, as the validated header places it (-1: not
    known, e.g. a Hub record whose files are gone). Readers `pread` at it, so what is read is
    exactly what the plan and the identity were made from."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in its file."""
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype in FLOATING


@dataclass(frozen=True)
class SafetensorsHeader:
    """One validated safetensors file header."""

    path: Path
    state: FileState
    """The file's stat when it was read (the memo key)."""
    digest: bytes
    """SHA-256 of the 8-byte length and the JSON header (what identities hash)."""
    data_start: int
    """File offset of the data section (8 + header length)."""
    tensors: dict[str, TensorInfo]
    """Every tensor's entry, by name, in data order."""
    offsets: dict[str, tuple[int, int]]
    """Every tensor's `data_offsets` (begin, end), relative to `data_start`."""
    metadata: dict[str, str] | None

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute file offsets [begin, end) of tensor `name`'s bytes."""
        begin, end = self.offsets[name]
        return self.data_start + begin, self.data_start + end


@dataclass(frozen=True)
class CheckpointHeaders:
    """The validated headers of every weight file of a checkpoint, and its tensors across them."""

    files: tuple[SafetensorsHeader, ...]
    """In `checkpoint.files` order."""
    tensors: dict[str, TensorInfo]


class HeaderError(ValueError):
    """What is wrong with a safetensors header (becomes CORRUPT_SAFETENSORS naming the file)."""


def corrupt_error(path: Path, label: str, detail: str) -> FailedPrecondition:
    """The CORRUPT_SAFETENSORS error for `path` of checkpoint `label`, saying what is wrong and what to do."""
    return FailedPrecondition(
        f"{path.name} of {label} is not a readable safetensors file ({detail}); re-download it, or re-save it "
        "with safetensors.torch.save_file",
        reason="CORRUPT_SAFETENSORS",
    )


# --------------------------------------------------------------------------------------------
# Pure validation (the same verdicts as safetensors)
# --------------------------------------------------------------------------------------------


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its key/value pairs in order, duplicates kept (safetensors rejects some)."""


def _no_constant(name: str) -> object:
    raise HeaderError(f"the header holds {name}, which is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise HeaderError(f"the header holds the number {text}, which is out of range")
    return value


def _check_tree(doc: object) -> None:
    """Reject nesting deeper than serde_json allows and strings holding lone surrogates."""
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise HeaderError("the header holds a string with a lone UTF-16 surrogate")
        elif isinstance(value, list):
            if depth + 1 > MAX_JSON_DEPTH:
                raise HeaderError(f"the header nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, _Pairs):
                for key, item in value:
                    stack.append((key, depth + 1))
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _dtype(name: str, value: object) -> str:
    if isinstance(value, _Pairs) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]  # serde's map form of a unit variant, {"F32": null}
    if not isinstance(value, str) or value not in SAFETENSORS_DTYPES:
        raise HeaderError(f"tensor {name} has unknown dtype {value!r}")
    return value


def _tensor_entry(name: str, value: object) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(value, _Pairs):
        raise HeaderError(f"the entry of tensor {name} is not a JSON object")
    fields: dict[str, object] = {}
    for key, item in value:
        if key in _TENSOR_FIELDS:
            if key in fields:
                raise HeaderError(f"tensor {name} has two {key} fields")
            fields[key] = item
    for key in _TENSOR_FIELDS:
        if key not in fields:
            raise HeaderError(f"tensor {name} has no {key}")
    dtype = _dtype(name, fields["dtype"])
    shape = fields["shape"]
    if not isinstance(shape, list) or isinstance(shape, _Pairs) or not all(_u64(d) for d in shape):
        raise HeaderError(f"tensor {name} has shape {shape!r}; a shape is a list of non-negative integers")
    offsets = fields["data_offsets"]
    if not isinstance(offsets, list) or isinstance(offsets, _Pairs) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
        raise HeaderError(f"tensor {name} has data_offsets {offsets!r}; they are two non-negative integers")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _k, v in value):
        raise HeaderError("__metadata__ is not a map of strings to strings")
    return {k: str(v) for k, v in value}


def parse_header(body: bytes, data_bytes: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str] | None]:
    """Validate a safetensors JSON header `body` followed by `data_bytes` bytes of data, as safetensors does.

    Returns the tensor entries (each with its absolute file offset, the data section starting
    right after `body`) and their data offsets (both in data order) and the metadata;
    raises HeaderError saying what is wrong. Pure: `path` only labels the TensorInfos.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_no_constant, parse_float=_float)
    except RecursionError:
        raise HeaderError(f"the header nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise HeaderError(f"the header is not valid JSON: {exc}") from None
    _check_tree(doc)
    if not isinstance(doc, _Pairs):
        raise HeaderError("the header is not a JSON object")
    entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    metadata: dict[str, str] | None = None
    seen_metadata = False
    for key, value in doc:
        if key == "__metadata__":
            if seen_metadata:
                raise HeaderError("the header has two __metadata__ entries")
            seen_metadata = True
            metadata = _metadata(value)
        else:
            entries[key] = _tensor_entry(key, value)  # a repeated name: the last entry counts, as in safetensors
    ordered = sorted(entries.items(), key=lambda kv: kv[1][2])
    start = 0
    for name, (dtype, shape, (begin, end)) in ordered:
        if begin != start or end < begin:
            raise HeaderError(
                f"tensor {name} has data_offsets [{begin}, {end}] but the previous tensor ends at {start} "
                "(offsets must be contiguous from 0, without gap or overlap)"
            )
        start = end
        elements = 1
        for dim in shape:
            elements *= dim
            if elements > _U64_MAX:
                raise HeaderError(f"the size of tensor {name} (shape {list(shape)}) overflows 64 bits")
        bits = elements * SAFETENSORS_DTYPES[dtype].bits
        if bits > _U64_MAX:
            raise HeaderError(f"the size of tensor {name} (shape {list(shape)}) overflows 64 bits")
        if bits % 8:
            raise HeaderError(f"tensor {name} ({dtype}, shape {list(shape)}) does not end on a byte boundary")
        if end - begin != bits // 8:
            raise HeaderError(f"tensor {name} spans {end - begin} bytes but {dtype} x {list(shape)} takes {bits // 8}")
    if start != data_bytes:
        what = "trailing bytes follow the tensors" if data_bytes > start else "the file is truncated"
        raise HeaderError(f"the tensors cover {start} data bytes but the file holds {data_bytes}: {what}")
    data_start = 8 + len(body)
    tensors = {name: TensorInfo(name, dtype, shape, path, data_start + begin) for name, (dtype, shape, (begin, _e)) in ordered}
    offsets = {name: span for name, (_d, _s, span) in ordered}
    return tensors, offsets, metadata


# --------------------------------------------------------------------------------------------
# Reading (thin I/O, memoised per file state)
# --------------------------------------------------------------------------------------------


class _HeaderMemo:
    """Validated headers by file state (thread-safe, least recently used out)."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[FileState, SafetensorsHeader] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, state: FileState) -> SafetensorsHeader | None:
        with self._lock:
            hit = self._entries.get(state)
            if hit is not None:
                self._entries.move_to_end(state)
            return hit

    def put(self, header: SafetensorsHeader) -> None:
        with self._lock:
            self._entries[header.state] = header
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


_MEMO = _HeaderMemo(4096)


def _changed(before: FileState, after: FileState) -> bool:
    return (before.size, before.inode, before.mtime_ns, before.ctime_ns) != (after.size, after.inode, after.mtime_ns, after.ctime_ns)


def read_header(path: Path, label: str, state: FileState | None = None) -> SafetensorsHeader:
    """The validated header of safetensors file `path` (of checkpoint `label`), parsed once per file state.

    `state`: the file's stat taken moments ago, if the caller has one; a memoised header for
    it answers without opening the file. Otherwise the file is opened, `fstat`-ed, and read
    unless its header for that state is already known. Raises CORRUPT_SAFETENSORS naming the
    file and what is wrong, CHECKPOINT_CHANGED when the opened file is no longer in `state`,
    or CHECKPOINT_UNREADABLE when it cannot be opened.
    """
    if state is not None:
        hit = _MEMO.get(state)
        if hit is not None:
            return hit
    try:
        with open(path, "rb") as handle:
            now = file_state(path, os.fstat(handle.fileno()))
            if state is not None and _changed(state, now):
                raise FailedPrecondition(
                    f"{path.name} of {label} changed while the request read it (it was being rewritten or truncated); "
                    "retry once the file is complete",
                    reason="CHECKPOINT_CHANGED",
                )
            hit = _MEMO.get(now)
            if hit is not None:
                return hit
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise HeaderError(f"the file holds {len(prefix)} bytes, fewer than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise HeaderError(f"the header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
            if 8 + length > now.size:
                raise HeaderError(f"the header length {length} runs past the end of the {now.size}-byte file")
            body = handle.read(length)
            if len(body) != length:
                raise HeaderError("the file ended inside the header (was it truncated while read?)")
    except HeaderError as exc:
        raise corrupt_error(path, label, str(exc)) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"{path.name} of {label} cannot be read ({exc.strerror or exc}); check that the file exists and is readable",
            reason="CHECKPOINT_UNREADABLE",
        ) from None
    try:
        tensors, offsets, metadata = parse_header(body, now.size - 8 - length, path)
    except HeaderError as exc:
        raise corrupt_error(path, label, str(exc)) from None
    header = SafetensorsHeader(path, now, hashlib.sha256(prefix + body).digest(), 8 + length, tensors, offsets, metadata)
    _MEMO.put(header)
    return header


def read_checkpoint_headers(checkpoint: Checkpoint, states: Sequence[FileState | None] = ()) -> CheckpointHeaders:
    """The validated headers of every weight file of `checkpoint`, and its tensors across them.

    `states`: the files' stats (in `checkpoint.files` order) when the caller just took them.
    Raises CORRUPT_SAFETENSORS for a bad file, DUPLICATE_TENSOR for a tensor in two shards,
    BAD_INDEX when the shard index places a tensor in a shard that does not hold it.
    """
    label = checkpoint.label
    given = list(states) if states else [None] * len(checkpoint.files)
    files = tuple(read_header(f, label, s) for f, s in zip(checkpoint.files, given, strict=True))
    tensors: dict[str, TensorInfo] = {}
    for header in files:
        for name, info in header.tensors.items():
            if name in tensors:
                raise FailedPrecondition(
                    f"tensor {name} of {label} appears in both {tensors[name].file.name} and {header.path.name}",
                    reason="DUPLICATE_TENSOR",
                )
            tensors[name] = info
    for name, file in checkpoint.weight_map.items():
        if name not in tensors or tensors[name].file != file:
            raise FailedPrecondition(
                f"the index of {label} places tensor {name} in {file.name}, but that shard does not hold it",
                reason="BAD_INDEX",
            )
    return CheckpointHeaders(files, tensors)
