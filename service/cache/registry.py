"""The checkpoint registry: kinship answered from cached fingerprints, deltas and pair results.

Per (base identity, checkpoint identity) the cache holds a task-vector fingerprint
(`fingerprint.py`) and, after RegisterCheckpoint, the full-resolution lossless delta
(`delta.py`, one cache entry per chunk plus a manifest written last). Per pair of
checkpoints, base and tensor set it holds the pair's exact similarities (overall and
per layer group). `KinshipCache` orchestrates:

- `kinship(...)` with mode EXACT, FINGERPRINT or AUTO:
  EXACT: pair results when every pair is cached (no weights read) -> a pass over the
  stored deltas when every model has one (the base is not read) -> a full streaming
  pass. AUTO: the same, but before the full pass it answers from fingerprints when
  every model has one over the same tensor set (and no per-layer breakdown was
  asked). FINGERPRINT: fingerprints only, FAILED_PRECONDITION when one is missing.
  Every full pass sketches the task vectors in the same pass (a ChunkObserver) and
  stores the fingerprints and the pair results, so every exact request warms the
  cache.
- `register(...)`: one pass over base + checkpoint storing fingerprint and delta.
- `fingerprint_matrix(...)`: an n x n kinship matrix from fingerprints alone (for
  RankCandidates / ShouldStop), or None when a fingerprint is missing.

Cache entries are keyed by content identities (`identity.py`), so an edited
checkpoint simply misses; results computed while a file changed underneath are not
stored.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import diskcache
import torch

from kinship_service.cache.delta import EncodedChunk, decode_delta, encode, from_bytes, to_parts
from kinship_service.cache.store import CacheStore
from kinship_service.checkpoints.identity import CheckpointIdentity, IdentityResolver
from kinship_service.checkpoints.sources import (
    Checkpoint,
    CheckpointSpec,
    HubRepo,
    describe,
    resolve,
    resolve_with_stats,
)
from kinship_service.checkpoints.streaming import CheckpointReader, ReadStats, TensorInfo
from kinship_service.config import Settings
from kinship_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    KinshipError,
    NeedsHeavyWork,
    NotFound,
    Unavailable,
)
from kinship_service.kinship.exact import (
    ComparisonPlan,
    ExactKinship,
    Skipped,
    TensorPlan,
    _group_key,
    _lockstep,
    _require_defined,
    exact_kinship,
    no_common_tensors,
    plan_comparison,
)
from kinship_service.kinship.fingerprint import (
    FINGERPRINT_VERSION,
    SKETCH_SEED,
    SKETCH_WIDTH,
    Fingerprint,
    GroupStats,
    SketchBuilder,
    StatsBuilder,
    build_fingerprints,
    estimate,
    tensor_set_key,
)
from kinship_service.kinship.similarity import PairwiseMoments, Similarities, similarities
from kinship_service.server import metrics

log = logging.getLogger("kinship.registry")

SCHEMA = "v1"
MEMORY_FINGERPRINT_BYTES = 512 * 2**20
"""In-process copies of verified fingerprints (1 MiB each), so hot FINGERPRINT queries skip the disk."""
DELTA_CHUNK_ELEMENTS = 4 * 2**20
"""Elements per stored delta chunk (one cache file each)."""

EXACT = "exact"
FINGERPRINT = "fingerprint"
AUTO = "auto"
MODES = (EXACT, FINGERPRINT, AUTO)

CheckpointLike = Checkpoint | CheckpointSpec
CACHE_WRITE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
"""What a failing cache write raises (disk full, database locked too long)."""


# -- keys ------------------------------------------------------------------------------
def _fp_key(base: str, ckpt: str) -> str:
    return f"fp/{SCHEMA}.{FINGERPRINT_VERSION}.{SKETCH_WIDTH}.{SKETCH_SEED}/{base}/{ckpt}"


def _delta_key(base: str, ckpt: str) -> str:
    return f"delta/{SCHEMA}/{base}/{ckpt}"


def _chunk_key(base: str, ckpt: str, tensor: int, chunk: int) -> str:
    return f"dchunk/{SCHEMA}/{base}/{ckpt}/{tensor}/{chunk}"


def _pair_key(base: str, a: str, b: str, plan_key: str) -> str:
    first, second = sorted((a, b))
    return f"pair/{SCHEMA}/{base}/{first}/{second}/{plan_key}"


def _hubref_key(repo_id: str, commit: str) -> str:
    return f"hubref/{SCHEMA}/{repo_id}@{commit}"


_COMMIT = re.compile(r"[0-9a-f]{40}")


def plan_key(plan: ComparisonPlan) -> str:
    """Digest of the tensor set a pass compares (names, shapes, and which were sliced)."""
    return tensor_set_key([(t.name + ("#sliced" if t.sliced else ""), t.shape) for t in plan.tensors])


def _tensor_list(plan: ComparisonPlan) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, tuple(t.shape)) for t in plan.tensors]


TensorList = list[tuple[str, tuple[int, ...]]]
_INTERNED_LOCK = threading.Lock()
_INTERNED: dict[tuple[tuple[str, tuple[int, ...]], ...], TensorList] = {}


def _interned(tensors: TensorList) -> TensorList:
    """One shared list object per distinct tensor set (never modified), equal to `tensors`.

    A fingerprint's tensor list is compared with the plan's on every FINGERPRINT
    request: hundreds of (name, shape) tuples for a real model. With both sides
    interned the comparison meets the very same tuples and Python's identity
    shortcut answers each in nanoseconds; it is still a full equality test.
    """
    try:
        key = tuple(tensors)
        hash(key)
    except TypeError:  # an unhashable shape: leave the list as it is
        return tensors
    with _INTERNED_LOCK:
        hit = _INTERNED.get(key)
        if hit is None:
            if len(_INTERNED) >= 256:
                _INTERNED.clear()
            hit = _INTERNED[key] = list(key)
        return hit


@dataclass(frozen=True)
class _PlanFacts:
    """What the light paths read off a (memoised, never modified) plan on every request: computed once per plan."""

    tensor_list: TensorList
    """`_tensor_list(plan)`, interned."""
    tensors_by_group: dict[str, int]
    """`_tensors_by_group(plan)`; hand out copies."""
    sliced: bool
    """Whether any tensor is compared over a leading slice."""


# -- serialisation -----------------------------------------------------------------------
_LEN = struct.Struct("<I")


def fingerprint_to_parts(fp: Fingerprint) -> list[bytes | memoryview]:
    meta = {
        "version": fp.version,
        "width": fp.width,
        "seed": fp.seed,
        "tensors": [[name, list(shape)] for name, shape in fp.tensors],
        "groups": {g: [s.count, s.sum, s.sum_squares] for g, s in fp.groups.items()},
        "skipped": [list(s) for s in fp.skipped],
    }
    head = json.dumps(meta).encode()
    head += b" " * (-(len(head) + _LEN.size) % 8)
    sketch = fp.sketch.to(torch.float32).contiguous()
    return [_LEN.pack(len(head)) + head, memoryview(sketch.view(torch.uint8).numpy())]


def fingerprint_from_bytes(payload: memoryview) -> Fingerprint:
    (length,) = _LEN.unpack_from(payload)
    meta = json.loads(bytes(payload[_LEN.size : _LEN.size + length]))
    offset = _LEN.size + length
    width = int(meta["width"])
    if len(payload) - offset != 4 * width:
        raise ValueError("fingerprint sketch has the wrong size")
    sketch = torch.frombuffer(payload, dtype=torch.uint8, count=4 * width, offset=offset).view(torch.float32).clone()
    return Fingerprint(
        sketch=sketch,
        groups={g: GroupStats(int(v[0]), float(v[1]), float(v[2])) for g, v in meta["groups"].items()},
        tensors=[(name, tuple(int(d) for d in shape)) for name, shape in meta["tensors"]],
        width=width,
        seed=int(meta["seed"]),
        version=int(meta["version"]),
        skipped=[tuple(s) for s in meta.get("skipped", [])],  # type: ignore[misc]
    )


@dataclass
class PairRecord:
    """Exact similarities of one pair over one tensor set: overall and per layer group."""

    ids: tuple[str, str]
    groups: dict[str, dict[str, object]]
    """group (and `*` for overall) -> {count, pcc, cosine, euclidean, norms: [a, b], means: [a, b]}."""

    def to_bytes(self) -> bytes:
        return json.dumps({"ids": list(self.ids), "groups": self.groups}).encode()

    @classmethod
    def from_bytes(cls, payload: memoryview) -> PairRecord:
        doc = json.loads(bytes(payload))
        return cls(ids=(doc["ids"][0], doc["ids"][1]), groups=doc["groups"])


def _pair_entry(sims: Similarities, i: int, j: int) -> dict[str, object]:
    return {
        "count": sims.count,
        "pcc": sims.pcc[i][j],
        "cosine": sims.cosine[i][j],
        "euclidean": sims.euclidean[i][j],
        "norms": [sims.norms[i], sims.norms[j]],
        "means": [sims.means[i], sims.means[j]],
    }


def _assemble(entries: dict[tuple[int, int], dict[str, object]], n: int) -> Similarities:
    """Similarities of n models from per-pair entries (i < j), keyed by request indices."""
    pcc = [[math.nan] * n for _ in range(n)]
    cosine = [[math.nan] * n for _ in range(n)]
    euclid = [[0.0] * n for _ in range(n)]
    norms = [math.nan] * n
    means = [math.nan] * n
    count = 0
    for (i, j), e in entries.items():
        count = int(e["count"])  # type: ignore[arg-type]
        for a, b, side in ((i, j, 0), (j, i, 1)):
            pcc[a][b] = float(e["pcc"])  # type: ignore[arg-type]
            cosine[a][b] = float(e["cosine"])  # type: ignore[arg-type]
            euclid[a][b] = float(e["euclidean"])  # type: ignore[arg-type]
            norms[a] = float(e["norms"][side])  # type: ignore[index]
            means[a] = float(e["means"][side])  # type: ignore[index]
    for i in range(n):
        if norms[i] > 0:
            cosine[i][i] = 1.0
        if any(not math.isnan(pcc[i][j]) for j in range(n) if j != i) or n == 1:
            pcc[i][i] = 1.0
    return Similarities(pcc=pcc, cosine=cosine, euclidean=euclid, norms=norms, means=means, count=count)


# -- observers -----------------------------------------------------------------------------
class FingerprintObserver:
    """Sketches and summarises every chunk of an exact pass (fingerprints for free).

    The pass hands over cache-sized blocks (64 Ki elements on CPU); consecutive blocks of
    one tensor are staged into a larger buffer first, so the per-call overhead of the
    sketch and statistics is paid per megabytes, not per block. Call `flush()` at the end.
    """

    def __init__(self, n: int, device: torch.device | str, staging_bytes: int = 64 * 2**20) -> None:
        self.sketch = SketchBuilder(n, device=device)
        self.stats = StatsBuilder(n)
        self._capacity = max(1 << 16, staging_bytes // (8 * n))
        self._staging = torch.empty((n, self._capacity), dtype=torch.float64, device=device)
        self._tensor: TensorPlan | None = None
        self._start = 0
        self._filled = 0

    def observe(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        k = deltas.shape[1]
        if k >= self._capacity:
            self.flush()
            self._emit(tensor, offset, deltas)
            return
        if self._tensor is not tensor or offset != self._start + self._filled or self._filled + k > self._capacity:
            self.flush()
            self._tensor, self._start = tensor, offset
        self._staging[:, self._filled : self._filled + k].copy_(deltas)
        self._filled += k

    def fused_target(self) -> tuple[SketchBuilder, StatsBuilder]:
        """The builders, for `cpu_kernel.fused_observer`: its kernel does `observe`'s work in the same read."""
        self.flush()
        return self.sketch, self.stats

    def flush(self) -> None:
        if self._tensor is not None and self._filled:
            self._emit(self._tensor, self._start, self._staging[:, : self._filled])
        self._tensor, self._filled = None, 0

    def _emit(self, tensor: TensorPlan, offset: int, deltas: torch.Tensor) -> None:
        self.sketch.add(tensor.name, offset, deltas)
        self.stats.add(tensor.group, deltas)


# -- results -------------------------------------------------------------------------------
@dataclass
class KinshipOutcome:
    """What `KinshipCache.kinship` answers: the result, how it was obtained, and the identities."""

    result: ExactKinship
    mode_used: str
    """`exact` or `fingerprint`."""
    source: str
    """`pass` (weights read), `pairs` (pair results), `deltas` (stored deltas) or `fingerprints`."""
    identities: list[str]
    base_identity: str


@dataclass
class Registration:
    """What RegisterCheckpoint reports."""

    identity: str
    base_identity: str
    already_registered: bool
    tensors: int
    elements: int
    size_bytes: int
    delta_sum: float
    delta_sum_squares: float
    layer_norms: list[tuple[str, float]]
    fingerprint_bytes: int
    delta_bytes: int
    seconds: float
    bytes_read: int = 0


@dataclass
class _Resolved:
    """A checkpoint reference resolved to its identity; `checkpoint` is None when only cached data remain."""

    label: str
    checkpoint: Checkpoint | None
    ident: CheckpointIdentity


class _DeltaUnavailable(Exception):
    """A stored delta turned out incomplete (evicted or corrupt chunk) mid-pass."""


@dataclass
class _Manifest:
    tensors: list[tuple[str, tuple[int, ...], list[int]]]
    """(name, shape, element count of each stored chunk)."""
    nbytes: int
    tensor_set: str

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"tensors": [[n, list(s), c] for n, s, c in self.tensors], "nbytes": self.nbytes, "tensor_set": self.tensor_set}
        ).encode()

    @classmethod
    def from_bytes(cls, payload: memoryview) -> _Manifest:
        doc = json.loads(bytes(payload))
        return cls([(n, tuple(s), list(c)) for n, s, c in doc["tensors"]], int(doc["nbytes"]), doc["tensor_set"])


# -- the service ---------------------------------------------------------------------------
class KinshipCache:
    """Cache-backed kinship and registration (one per server; thread-safe)."""

    def __init__(self, settings: Settings, device: torch.device | str = "cpu", store: CacheStore | None = None) -> None:
        self.settings = settings
        self.device = torch.device(device)
        try:
            self.store = store if store is not None else CacheStore(settings.cache_dir, settings.cache_size_limit)
        except (OSError, sqlite3.Error) as exc:
            raise RuntimeError(
                f"cannot open the cache in {settings.cache_dir} ({exc}); set KINSHIP_CACHE_DIR to a writable directory"
            ) from None
        self.identities = IdentityResolver()
        self._memory: OrderedDict[str, Fingerprint] = OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self._plans: OrderedDict[tuple[object, ...], ComparisonPlan] = OrderedDict()
        self._plan_facts_memo: dict[int, tuple[weakref.ref[ComparisonPlan], _PlanFacts]] = {}
        self._hub_seen: set[str] = set()

    def close(self) -> None:
        self.store.close()

    # -- helpers ---------------------------------------------------------------------------
    def _resolve(self, item: CheckpointLike, field_name: str) -> Checkpoint:
        if isinstance(item, Checkpoint):
            return item
        return resolve(item, self.settings.allowed_roots, field_name)

    def _resolve_ident(self, item: CheckpointLike, field_name: str) -> _Resolved:
        """Resolve and identify a reference.

        A Hub checkpoint pinned to a commit hash that is no longer in the Hub cache
        resolves from the record kept when it was last seen (its identity and tensor
        headers), so cached fingerprints, deltas and pair results still answer for it.
        """
        try:
            if isinstance(item, Checkpoint):
                checkpoint, stats = item, ()
            else:  # the stats taken while resolving spare identify() a second stat of each file
                checkpoint, stats = resolve_with_stats(item, self.settings.allowed_roots, field_name)
        except NotFound:
            if isinstance(item, HubRepo) and _COMMIT.fullmatch(item.revision or ""):
                ident = self._hub_record(item.repo_id, item.revision)
                if ident is not None:
                    return _Resolved(describe(item), None, ident)
            raise
        ident = self.identities.identify(checkpoint, stats)
        if isinstance(item, HubRepo) and ident.identity.startswith("hub-"):
            self._remember_hub(item.repo_id, checkpoint.revision, ident)
        return _Resolved(checkpoint.label, checkpoint, ident)

    def _remember_hub(self, repo_id: str, commit: str, ident: CheckpointIdentity) -> None:
        key = _hubref_key(repo_id, commit)
        with self._lock:
            if key in self._hub_seen:
                return
            self._hub_seen.add(key)
        record = {
            "identity": ident.identity,
            "size_bytes": ident.size_bytes,
            "headers": [[i.name, i.dtype, list(i.shape)] for i in ident.headers.values()],
        }
        self.store.put(key, json.dumps(record).encode())

    def _hub_record(self, repo_id: str, commit: str) -> CheckpointIdentity | None:
        payload = self.store.get(_hubref_key(repo_id, commit))
        if payload is None:
            return None
        try:
            doc = json.loads(bytes(payload))
            where = Path(f"hf://{repo_id}@{commit}")
            headers = {name: TensorInfo(name, dtype, tuple(int(d) for d in shape), where) for name, dtype, shape in doc["headers"]}
            return CheckpointIdentity(doc["identity"], int(doc["size_bytes"]), headers, ())
        except (ValueError, KeyError, TypeError):
            self.store.delete(_hubref_key(repo_id, commit))
            return None

    @staticmethod
    def _files_needed(resolved: Sequence[_Resolved], why: str) -> list[Checkpoint]:
        absent = [r.label for r in resolved if r.checkpoint is None]
        if absent:
            raise NotFound(
                f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} no longer in the Hub cache and the cache "
                f"holds no {why}; download {'it' if len(absent) == 1 else 'them'} again (or allow Hub access)",
                reason="HUB_NOT_FOUND",
            )
        return [r.checkpoint for r in resolved]  # type: ignore[misc]

    def _plan(self, idents: Sequence[CheckpointIdentity], labels: Sequence[str], leading_slice: bool) -> ComparisonPlan:
        key = (tuple(i.identity for i in idents), tuple(labels), leading_slice)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit
        plan = plan_comparison([i.headers for i in idents], labels, leading_slice)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > 1024:
                self._plans.popitem(last=False)
        return plan

    def _plan_facts(self, plan: ComparisonPlan) -> _PlanFacts:
        """The `_PlanFacts` of `plan`, memoised by the plan object (held weakly: an evicted plan's entry never answers)."""
        with self._lock:
            hit = self._plan_facts_memo.get(id(plan))
        if hit is not None and hit[0]() is plan:
            return hit[1]
        facts = _PlanFacts(_interned(_tensor_list(plan)), _tensors_by_group(plan), any(t.sliced for t in plan.tensors))
        with self._lock:
            if len(self._plan_facts_memo) >= 4096:
                self._plan_facts_memo.clear()
            self._plan_facts_memo[id(plan)] = (weakref.ref(plan), facts)
        return facts

    def _pair_plan(self, base: CheckpointIdentity, model: CheckpointIdentity) -> ComparisonPlan:
        return self._plan([base, model], ["base", "checkpoint"], False)

    def _canonical(self, joint: ComparisonPlan, base: CheckpointIdentity, model: CheckpointIdentity) -> bool:
        """True when a pass over `joint` covers exactly the model's own tensor set against the base."""
        if any(t.sliced for t in joint.tensors):
            return False
        return _tensor_list(joint) == _tensor_list(self._pair_plan(base, model))

    def get_fingerprint(self, base_id: str, ckpt_id: str) -> Fingerprint | None:
        """The cached fingerprint of a checkpoint against a base, or None."""
        key = _fp_key(base_id, ckpt_id)
        with self._lock:
            fp = self._memory.get(key)
            if fp is not None:
                self._memory.move_to_end(key)
        if fp is not None:
            metrics.CACHE_HITS.labels("mem").inc()
            return fp
        payload = self.store.get(key)
        if payload is None:
            return None
        try:
            fp = fingerprint_from_bytes(payload)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.store.delete(key)
            metrics.CACHE_CORRUPT.inc()
            return None
        self._remember(key, fp)
        return fp

    def _remember(self, key: str, fp: Fingerprint) -> None:
        fp.tensors = _interned(fp.tensors)  # an equal list: cheap comparisons with plans (see _interned)
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = fp
            self._memory_bytes += fp.nbytes
            while self._memory_bytes > MEMORY_FINGERPRINT_BYTES and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= old.nbytes

    def forget_memory(self) -> None:
        """Drop the in-process fingerprint copies (tests; the disk cache is untouched)."""
        with self._lock:
            self._memory.clear()
            self._memory_bytes = 0
            self._plans.clear()

    def _put_fingerprint(self, base_id: str, ckpt_id: str, fp: Fingerprint) -> int:
        key = _fp_key(base_id, ckpt_id)
        stored = self.store.put(key, fingerprint_to_parts(fp))
        self._remember(key, fp)
        return stored

    def _get_manifest(self, base_id: str, ckpt_id: str) -> _Manifest | None:
        key = _delta_key(base_id, ckpt_id)
        payload = self.store.get(key)
        if payload is None:
            return None
        try:
            return _Manifest.from_bytes(payload)
        except (ValueError, KeyError, TypeError):
            self.store.delete(key)
            metrics.CACHE_CORRUPT.inc()
            return None

    def _raise_if_changed(self, checkpoints: Sequence[Checkpoint], idents: Sequence[CheckpointIdentity]) -> None:
        """FAILED_PRECONDITION (CHECKPOINT_CHANGED) naming the checkpoints whose files changed since they were identified."""
        changed = [c.label for c, ident in zip(checkpoints, idents, strict=False) if not self.identities.unchanged(ident)]
        if changed:
            log.warning("a checkpoint changed while it was read", extra={"checkpoints": changed})
            raise FailedPrecondition(
                f"{', '.join(changed)} changed (rewritten or truncated) while {'it was' if len(changed) == 1 else 'they were'} "
                "being read, so the result would mix two versions; retry once the files are completely written",
                reason="CHECKPOINT_CHANGED",
            )

    def _unchanged(self, idents: Sequence[CheckpointIdentity]) -> bool:
        if all(self.identities.unchanged(i) for i in idents):
            return True
        log.warning("a checkpoint changed while it was read; its results are not cached")
        return False

    # -- Kinship ---------------------------------------------------------------------------
    def kinship(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        *,
        mode: str = AUTO,
        leading_slice: bool = False,
        per_layer: bool = False,
        check_cancelled: Callable[[], None] = lambda: None,
        light_only: bool = False,
    ) -> KinshipOutcome:
        """Kinship of `models` against `base` in `mode` (exact, fingerprint or auto); see the module docstring.

        `light_only`: answer only from cached pair results or fingerprints, and raise NeedsHeavyWork
        where the answer needs a pass over stored deltas or the weights (the front process).
        """
        started = time.perf_counter()
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}; use one of {', '.join(MODES)}", field="mode")
        if len(models) < 2:
            raise InvalidArgument(f"kinship needs at least two models, got {len(models)}", field="models")
        base_r = self._resolve_ident(base, "base")
        model_rs = [self._resolve_ident(m, f"models[{i}]") for i, m in enumerate(models)]
        base_ident = base_r.ident
        idents = [r.ident for r in model_rs]
        ids = [i.identity for i in idents]
        labels = [r.label for r in (base_r, *model_rs)]
        plan = self._plan([base_ident, *idents], labels, leading_slice)
        if not plan.tensors:
            raise no_common_tensors()  # the exact pass's error, without reading any weights

        def outcome(result: ExactKinship, mode_used: str, source: str) -> KinshipOutcome:
            result.seconds = time.perf_counter() - started
            metrics.KINSHIP_MODE_USED.labels(mode_used).inc()
            return KinshipOutcome(result, mode_used, source, ids, base_ident.identity)

        if mode == FINGERPRINT:
            fps, missing = self._fingerprints(base_ident, idents, plan)
            if missing:
                names = ", ".join(f"models[{i}] ({model_rs[i].label})" for i in missing)
                raise FailedPrecondition(
                    f"no usable fingerprint of {names} against this base over the compared tensors; call "
                    "RegisterCheckpoint for it (or run one EXACT request), or use mode EXACT or AUTO",
                    reason="FINGERPRINT_MISSING",
                )
            return outcome(self._from_fingerprints(fps, plan, model_rs), FINGERPRINT, "fingerprints")

        cached = self._from_pairs(base_ident, idents, plan)
        if cached is not None:
            return outcome(cached, EXACT, "pairs")
        manifests = self._delta_manifests(base_ident, idents, plan)
        if manifests is not None:
            if light_only:
                raise NeedsHeavyWork("a pass over the stored deltas")
            from_deltas = self._from_deltas(base_ident, idents, plan, manifests, model_rs, check_cancelled)
            if from_deltas is not None:
                return outcome(from_deltas, EXACT, "deltas")
        if mode == AUTO and not per_layer:
            fps, missing = self._fingerprints(base_ident, idents, plan)
            if not missing:
                return outcome(self._from_fingerprints(fps, plan, model_rs), FINGERPRINT, "fingerprints")
        if light_only:
            raise NeedsHeavyWork("a pass over the weights")
        base_ckpt, *model_ckpts = self._files_needed([base_r, *model_rs], "exact results for this request")
        result = self._full_pass(base_ckpt, model_ckpts, base_ident, idents, plan, leading_slice, check_cancelled)
        return outcome(result, EXACT, "pass")

    def _fingerprints(
        self, base: CheckpointIdentity, idents: Sequence[CheckpointIdentity], plan: ComparisonPlan
    ) -> tuple[list[Fingerprint], list[int]]:
        facts = self._plan_facts(plan)
        tensors = facts.tensor_list
        sliced = facts.sliced
        fps: list[Fingerprint] = []
        missing: list[int] = []
        for i, ident in enumerate(idents):
            fp = self.get_fingerprint(base.identity, ident.identity)
            if fp is None or sliced or fp.tensors != tensors:
                missing.append(i)
            else:
                fps.append(fp)
        return fps, missing

    def _from_fingerprints(self, fps: Sequence[Fingerprint], plan: ComparisonPlan, models: Sequence[_Resolved]) -> ExactKinship:
        sims = estimate(fps)
        _require_defined(sims, models)  # type: ignore[arg-type]  # (uses .label only)
        return ExactKinship(
            overall=sims,
            by_group={},
            tensors_by_group=dict(self._plan_facts(plan).tensors_by_group),
            plan=plan,
            bytes_read=0,
            device="cpu",
            seconds=0.0,
        )

    def _from_pairs(self, base: CheckpointIdentity, idents: Sequence[CheckpointIdentity], plan: ComparisonPlan) -> ExactKinship | None:
        key_of_plan = plan_key(plan)
        n = len(idents)
        per_group: dict[str, dict[tuple[int, int], dict[str, object]]] = {}
        for i in range(n):
            for j in range(i + 1, n):
                key = _pair_key(base.identity, idents[i].identity, idents[j].identity, key_of_plan)
                payload = self.store.get(key)
                if payload is None:
                    return None
                try:
                    record = PairRecord.from_bytes(payload)
                except (ValueError, KeyError, TypeError, IndexError):
                    self.store.delete(key)
                    metrics.CACHE_CORRUPT.inc()
                    return None
                swap = record.ids[0] != idents[i].identity
                for group, entry in record.groups.items():
                    if swap:
                        entry = dict(entry)
                        entry["norms"] = list(reversed(entry["norms"]))  # type: ignore[call-overload]
                        entry["means"] = list(reversed(entry["means"]))  # type: ignore[call-overload]
                    per_group.setdefault(group, {})[(i, j)] = entry
        overall = _assemble(per_group.pop("*"), n)
        tensors_by_group = _tensors_by_group(plan)
        by_group = {g: _assemble(per_group[g], n) for g in sorted(tensors_by_group, key=_group_key) if g in per_group}
        return ExactKinship(
            overall=overall,
            by_group=by_group,
            tensors_by_group=tensors_by_group,
            plan=plan,
            bytes_read=0,
            device=str(self.device),
            seconds=0.0,
        )

    def _store_pairs(self, base: CheckpointIdentity, idents: Sequence[CheckpointIdentity], plan: ComparisonPlan, result: ExactKinship) -> None:
        key_of_plan = plan_key(plan)
        n = len(idents)
        items = []
        for i in range(n):
            for j in range(i + 1, n):
                groups = {"*": _pair_entry(result.overall, i, j)}
                for group, sims in result.by_group.items():
                    groups[group] = _pair_entry(sims, i, j)
                record = PairRecord((idents[i].identity, idents[j].identity), groups)
                items.append((_pair_key(base.identity, idents[i].identity, idents[j].identity, key_of_plan), record.to_bytes()))
        self.store.put_many(items)

    def _full_pass(
        self,
        base_ckpt: Checkpoint,
        model_ckpts: Sequence[Checkpoint],
        base_ident: CheckpointIdentity,
        idents: Sequence[CheckpointIdentity],
        plan: ComparisonPlan,
        leading_slice: bool,
        check_cancelled: Callable[[], None],
    ) -> ExactKinship:
        eligible = [
            self._canonical(plan, base_ident, ident) and not self.store.contains(_fp_key(base_ident.identity, ident.identity))
            for ident in idents
        ]
        observer = FingerprintObserver(len(idents), self.device) if any(eligible) else None
        try:
            result = exact_kinship(
                base_ckpt,
                model_ckpts,
                leading_slice=leading_slice,
                device=self.device,
                chunk_bytes=self.settings.chunk_bytes,
                check_cancelled=check_cancelled,
                observers=[observer] if observer is not None else [],
                stats=ReadStats(),
                use_cpu_kernel=self.settings.cpu_kernel,
                headers=[base_ident.headers, *(ident.headers for ident in idents)],
                plan=plan,
            )
        except KinshipError:
            self._raise_if_changed([base_ckpt, *model_ckpts], [base_ident, *idents])  # the real cause
            raise
        # A file rewritten or truncated during the pass: the numbers mix two versions; say so.
        self._raise_if_changed([base_ckpt, *model_ckpts], [base_ident, *idents])
        try:
            if observer is not None:
                observer.flush()
                skipped = [_skipped_tuples(self._pair_plan(base_ident, ident).skipped) for ident in idents]
                fps = build_fingerprints(observer.sketch.sketch, observer.stats, _tensor_list(plan), skipped)
                for i, ident in enumerate(idents):
                    if eligible[i]:
                        self._put_fingerprint(base_ident.identity, ident.identity, fps[i])
            self._store_pairs(base_ident, idents, plan, result)
        except CACHE_WRITE_ERRORS as exc:  # the answer stands; only the warming failed
            log.warning("could not store results in the cache", extra={"error": repr(exc)})
        return result

    # -- deltas ----------------------------------------------------------------------------
    def _delta_manifests(
        self, base: CheckpointIdentity, idents: Sequence[CheckpointIdentity], plan: ComparisonPlan
    ) -> list[_Manifest] | None:
        """The stored-delta manifests of every model over exactly the planned tensors, or None (then no delta pass)."""
        if any(t.sliced for t in plan.tensors):
            return None
        tensors = _tensor_list(plan)
        manifests = []
        for ident in idents:
            manifest = self._get_manifest(base.identity, ident.identity)
            if manifest is None or [(n, s) for n, s, _ in manifest.tensors] != tensors:
                return None
            manifests.append(manifest)
        return manifests

    def _from_deltas(
        self,
        base: CheckpointIdentity,
        idents: Sequence[CheckpointIdentity],
        plan: ComparisonPlan,
        manifests: Sequence[_Manifest],
        models: Sequence[_Resolved],
        check_cancelled: Callable[[], None],
    ) -> ExactKinship | None:
        try:
            result = self._delta_pass(base, idents, plan, manifests, models, check_cancelled)
        except _DeltaUnavailable as exc:
            log.info("stored delta incomplete, falling back to reading the weights", extra={"detail": str(exc)})
            return None
        try:
            self._store_pairs(base, idents, plan, result)
        except CACHE_WRITE_ERRORS as exc:
            log.warning("could not store results in the cache", extra={"error": repr(exc)})
        return result

    def _delta_chunks(self, base_id: str, ckpt_id: str, t_index: int, counts: Sequence[int]) -> Iterator[torch.Tensor]:
        for c_index, count in enumerate(counts):
            key = _chunk_key(base_id, ckpt_id, t_index, c_index)
            payload = self.store.get(key)
            if payload is None:
                self.store.delete(_delta_key(base_id, ckpt_id))
                raise _DeltaUnavailable(f"chunk {key} is missing or damaged")
            try:
                chunk = from_bytes(payload)
            except (ValueError, KeyError, TypeError):
                self.store.delete(key)
                self.store.delete(_delta_key(base_id, ckpt_id))
                raise _DeltaUnavailable(f"chunk {key} does not parse") from None
            if chunk.numel != count:
                self.store.delete(_delta_key(base_id, ckpt_id))
                raise _DeltaUnavailable(f"chunk {key} has {chunk.numel} elements, expected {count}")
            yield decode_delta(chunk)

    def _delta_pass(
        self,
        base: CheckpointIdentity,
        idents: Sequence[CheckpointIdentity],
        plan: ComparisonPlan,
        manifests: Sequence[_Manifest],
        models: Sequence[_Resolved],
        check_cancelled: Callable[[], None],
    ) -> ExactKinship:
        """Exact kinship from stored deltas alone: the same float64 task vectors, the base is not read."""
        started = time.perf_counter()
        n = len(idents)
        max_elements = max(4096, self.settings.chunk_bytes // (8 * (n + 1)))
        buffer = torch.empty((n, max_elements), dtype=torch.float64, device=self.device)
        moments: dict[str, PairwiseMoments] = {}
        tensors_by_group: dict[str, int] = {}
        for t_index, tensor in enumerate(plan.tensors):
            check_cancelled()
            group = moments.setdefault(tensor.group, PairwiseMoments(n, device=self.device))
            tensors_by_group[tensor.group] = tensors_by_group.get(tensor.group, 0) + 1
            streams = [
                self._delta_chunks(base.identity, ident.identity, t_index, manifest.tensors[t_index][2])
                for ident, manifest in zip(idents, manifests, strict=False)
            ]
            pending: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * n
            remaining = math.prod(tensor.shape)
            while remaining > 0:
                step = min(max_elements, remaining)
                for row in range(n):
                    filled = 0
                    while filled < step:
                        if pending[row].numel() == 0:
                            nxt = next(streams[row], None)
                            if nxt is None:
                                raise _DeltaUnavailable(f"stored delta of {tensor.name} is short")
                            pending[row] = nxt
                        take = min(step - filled, pending[row].numel())
                        buffer[row, filled : filled + take].copy_(pending[row][:take])
                        pending[row] = pending[row][take:]
                        filled += take
                group.update(buffer[:, :step])
                remaining -= step
                check_cancelled()
        total = PairwiseMoments(n, device=self.device)
        for group_moments in moments.values():
            total.merge(group_moments)
        overall = similarities(total)
        _require_defined(overall, models)  # type: ignore[arg-type]  # (uses .label only)
        return ExactKinship(
            overall=overall,
            by_group={g: similarities(m) for g, m in sorted(moments.items(), key=lambda kv: _group_key(kv[0]))},
            tensors_by_group=tensors_by_group,
            plan=plan,
            bytes_read=0,
            device=str(self.device),
            seconds=time.perf_counter() - started,
        )

    def read_delta(self, base: CheckpointLike, checkpoint: CheckpointLike) -> Iterator[tuple[str, Iterator[EncodedChunk]]]:
        """Stream a registered checkpoint's stored delta back, tensor by tensor (chunks of EncodedChunk).

        Pair with `delta.reconstruct(chunk, base_chunk_float64)` to rebuild the weights bit for bit.
        Raises FailedPrecondition when the checkpoint is not registered against this base.
        """
        base_ident = self._resolve_ident(base, "base").ident
        ident = self._resolve_ident(checkpoint, "checkpoint").ident
        manifest = self._get_manifest(base_ident.identity, ident.identity)
        if manifest is None:
            raise FailedPrecondition("no stored delta for this checkpoint and base; call RegisterCheckpoint", reason="DELTA_MISSING")

        def chunks(t_index: int, counts: list[int]) -> Iterator[EncodedChunk]:
            for c_index in range(len(counts)):
                payload = self.store.get(_chunk_key(base_ident.identity, ident.identity, t_index, c_index))
                if payload is None:
                    raise FailedPrecondition("a stored delta chunk was evicted or damaged; register again", reason="DELTA_MISSING")
                yield from_bytes(payload)

        for t_index, (name, _shape, counts) in enumerate(manifest.tensors):
            yield name, chunks(t_index, counts)

    # -- RegisterCheckpoint ----------------------------------------------------------------
    def register(
        self,
        checkpoint: CheckpointLike,
        base: CheckpointLike,
        *,
        check_cancelled: Callable[[], None] = lambda: None,
    ) -> Registration:
        """Compute and store the fingerprint and lossless delta of `checkpoint` against `base` (one pass)."""
        started = time.perf_counter()
        base_r = self._resolve_ident(base, "base")
        ckpt_r = self._resolve_ident(checkpoint, "checkpoint")
        base_ident, ident = base_r.ident, ckpt_r.ident
        plan = self._plan([base_ident, ident], [base_r.label, ckpt_r.label], False)
        if not plan.tensors:
            raise InvalidArgument(
                f"{ckpt_r.label} shares no floating tensor of one shape with the base {base_r.label}; "
                "check that it was fine-tuned from this base",
                reason="NO_COMMON_TENSORS",
                field="checkpoint",
            )
        fp = self.get_fingerprint(base_ident.identity, ident.identity)
        manifest = self._get_manifest(base_ident.identity, ident.identity)
        delta_storable = self._delta_storable(plan)
        if fp is not None and (
            not delta_storable
            or (manifest is not None and self._delta_complete(base_ident.identity, ident.identity, manifest))
        ):
            return self._registration(base_ident, ident, fp, manifest, True, started, 0)
        stats = ReadStats()
        base_ckpt, ckpt = self._files_needed([base_r, ckpt_r], "complete registration for it")
        try:
            fp, manifest = self._register_pass(base_ckpt, ckpt, base_ident, ident, plan, stats, check_cancelled)
        except CACHE_WRITE_ERRORS as exc:
            raise Unavailable(
                f"the cache in {self.settings.cache_dir} could not store the registration ({exc}); free disk space "
                "or raise KINSHIP_CACHE_SIZE_LIMIT below the free space, then retry",
                reason="CACHE_WRITE_FAILED",
            ) from None
        return self._registration(base_ident, ident, fp, manifest, False, started, stats.total_bytes)

    def _delta_storable(self, plan: ComparisonPlan) -> bool:
        """Deltas (about 4 bytes per element) are stored when they take at most a quarter of the cache."""
        return plan.elements * 4 <= self.store.size_limit // 4

    def _delta_complete(self, base_id: str, ckpt_id: str, manifest: _Manifest) -> bool:
        return all(
            self.store.contains(_chunk_key(base_id, ckpt_id, t, c))
            for t, (_n, _s, counts) in enumerate(manifest.tensors)
            for c in range(len(counts))
        )

    def _registration(
        self,
        base: CheckpointIdentity,
        ident: CheckpointIdentity,
        fp: Fingerprint,
        manifest: _Manifest | None,
        already: bool,
        started: float,
        bytes_read: int,
    ) -> Registration:
        total = fp.total
        return Registration(
            identity=ident.identity,
            base_identity=base.identity,
            already_registered=already,
            tensors=len(fp.tensors),
            elements=total.count,
            size_bytes=ident.size_bytes,
            delta_sum=total.sum,
            delta_sum_squares=total.sum_squares,
            layer_norms=[(g, fp.groups[g].norm) for g in sorted(fp.groups, key=_group_key)],
            fingerprint_bytes=fp.nbytes,
            delta_bytes=manifest.nbytes if manifest is not None else 0,
            seconds=time.perf_counter() - started,
            bytes_read=bytes_read,
        )

    def _register_pass(
        self,
        base_ckpt: Checkpoint,
        ckpt: Checkpoint,
        base_ident: CheckpointIdentity,
        ident: CheckpointIdentity,
        plan: ComparisonPlan,
        stats: ReadStats,
        check_cancelled: Callable[[], None],
    ) -> tuple[Fingerprint, _Manifest | None]:
        readers = [CheckpointReader(base_ckpt, stats, base_ident.headers), CheckpointReader(ckpt, stats, ident.headers)]
        sketch = SketchBuilder(1, device=self.device)
        group_stats = StatsBuilder(1)
        store_delta = self._delta_storable(plan)
        manifest_tensors: list[tuple[str, tuple[int, ...], list[int]]] = []
        delta_bytes = 0
        widest = max(max(1, math.prod(t.shape[1:])) for t in plan.tensors)
        read_elements = max(DELTA_CHUNK_ELEMENTS, widest)
        for t_index, tensor in enumerate(plan.tensors):
            check_cancelled()
            counts: list[int] = []
            offset = 0
            for c_index, (base_chunk, model_chunk) in enumerate(_lockstep(readers, tensor, read_elements)):
                base64 = base_chunk.reshape(-1).to(device=self.device, dtype=torch.float64)
                model = model_chunk.reshape(-1).to(self.device)
                d64 = model.to(torch.float64) - base64
                row = d64.unsqueeze(0)
                sketch.add(tensor.name, offset, row)
                group_stats.add(tensor.group, row)
                if store_delta:
                    encoded = encode(model, base64, d64)
                    encoded = EncodedChunk(encoded.dtype, encoded.delta.cpu(), encoded.patch_index.cpu(), encoded.patch_bits.cpu())
                    delta_bytes += self.store.put(_chunk_key(base_ident.identity, ident.identity, t_index, c_index), to_parts(encoded))
                counts.append(d64.numel())
                offset += d64.numel()
                check_cancelled()
            manifest_tensors.append((tensor.name, tuple(tensor.shape), counts))
        fp = build_fingerprints(sketch.sketch, group_stats, _tensor_list(plan), [_skipped_tuples(plan.skipped)])[0]
        if not self._unchanged([base_ident, ident]):
            raise FailedPrecondition(
                f"{ckpt.label} or its base changed while it was being registered; register it again once it is written",
                reason="CHECKPOINT_CHANGED",
            )
        manifest = None
        if store_delta:
            manifest = _Manifest(manifest_tensors, delta_bytes, tensor_set_key(_tensor_list(plan)))
            self.store.put(_delta_key(base_ident.identity, ident.identity), manifest.to_bytes())
        self._put_fingerprint(base_ident.identity, ident.identity, fp)
        return fp, manifest

    # -- matrices for other RPCs -------------------------------------------------------------
    def compute(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        mode: str,
        check_cancelled: Callable[[], None],
        light_only: bool = False,
    ) -> tuple[ExactKinship, str]:
        """The `population_kinship.KinshipBackend` seam: kinship of `models` in `mode`, and the mode used.

        Pass `compute=servicer.kinship_cache.compute` to `pairwise_kinship` and RankCandidates /
        ShouldStop get FINGERPRINT and AUTO (cached pair results, deltas, fingerprints) for free.
        """
        outcome = self.kinship(base, models, mode=mode, check_cancelled=check_cancelled, light_only=light_only)
        return outcome.result, outcome.mode_used

    def fingerprint_matrix(
        self, base: CheckpointLike, checkpoints: Sequence[CheckpointLike], metric: str = "pcc"
    ) -> list[list[float]] | None:
        """The n x n kinship matrix of `checkpoints` against `base` from cached fingerprints alone.

        `metric` is `pcc`, `cosine` or `euclidean`. Returns None when any fingerprint is
        missing or they cover different tensor sets (then use an exact pass). Never reads
        weights (only the safetensors headers, to identify the checkpoints).
        """
        if metric not in ("pcc", "cosine", "euclidean"):
            raise InvalidArgument(f"unknown metric {metric!r}; use pcc, cosine or euclidean", field="metric")
        base_ident = self._resolve_ident(base, "base").ident
        fps: list[Fingerprint] = []
        for i, c in enumerate(checkpoints):
            ident = self._resolve_ident(c, f"checkpoints[{i}]").ident
            fp = self.get_fingerprint(base_ident.identity, ident.identity)
            if fp is None or (fps and not fp.comparable_with(fps[0])):
                return None
            fps.append(fp)
        if not fps:
            return []
        sims = estimate(fps)
        return getattr(sims, metric)


def _tensors_by_group(plan: ComparisonPlan) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in plan.tensors:
        out[t.group] = out.get(t.group, 0) + 1
    return out


def _skipped_tuples(skipped: Sequence[Skipped]) -> list[tuple[str, str, str]]:
    return [(s.name, s.reason, s.detail) for s in skipped]
