"""The checkpoint registry: kinship answered from cached fingerprints, deltas and pair results.

Per (base identity, checkpoint identity) the cache holds a task-vector fingerprint
(`fingerprints.py`) and, after RegisterCheckpoint, the full-resolution lossless delta
(`deltas.py`). Per pair of checkpoints, base and tensor set it holds the pair's exact
similarities (`answers.PairResults`). `KinshipCache` orchestrates:

- `kinship(...)` with mode EXACT, FINGERPRINT or AUTO:
  EXACT: pair results when every pair is cached (no weights read) -> a pass over the
  stored deltas when every model has one (the base is not read) -> a full streaming
  pass. AUTO: the same, but before the full pass it answers from fingerprints when
  every model has one over the same tensor set (and no per-layer breakdown was
  asked). FINGERPRINT: fingerprints only, FAILED_PRECONDITION when one is missing.
  Every full pass sketches the task vectors in the same pass (`observer.py`) and
  stores the fingerprints and the pair results, so every exact request warms the
  cache; it is also where every exact pass is counted in the metrics.
- `cached_kinship(...)`: the same chain as far as the cache alone answers (the front
  process): an outcome, or None where a pass over stored deltas or weights is needed.
- `register(...)`: one pass over base + checkpoint storing fingerprint and delta.
- `fingerprint_matrix(...)`: an n x n kinship matrix from fingerprints alone (used
  by bench/cache.py), or None when a fingerprint is missing.

Cache entries are keyed by content identities (`identity.py`), so an edited
checkpoint simply misses; results computed while a file changed underneath are not
stored.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import diskcache
import torch

from kinship_service.cache.answers import PairResults, from_fingerprints, kinship_result, usable_fingerprints
from kinship_service.cache.delta import EncodedChunk
from kinship_service.cache.deltas import DeltaStore, DeltaUnavailable, Manifest
from kinship_service.cache.fingerprints import FingerprintCache
from kinship_service.cache.hub_records import HubRecords
from kinship_service.cache.observer import FingerprintObserver
from kinship_service.cache.plans import PlanMemo, skipped_tuples, tensor_list
from kinship_service.cache.registration import Registration, RegistrationStores, register_pass, registration
from kinship_service.cache.resolution import CheckpointLike, Resolved, Resolver
from kinship_service.cache.sign_conflicts import SignConflicts
from kinship_service.cache.store import CacheStore
from kinship_service.checkpoints.identity import CheckpointIdentity, IdentityResolver
from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.checkpoints.streaming import ReadStats
from kinship_service.config import Settings
from kinship_service.errors import FailedPrecondition, InvalidArgument, KinshipError, Unavailable
from kinship_service.kinship.exact import ComparisonPlan, ExactKinship, exact_kinship, no_common_tensors
from kinship_service.kinship.fingerprint import Fingerprint, build_fingerprints, estimate
from kinship_service.kinship.modes import AUTO, EXACT, FINGERPRINT, MODES, KinshipMode, ModeUsed
from kinship_service.kinship.sign_conflict import SignConflictObserver
from kinship_service.kinship.similarity import PairwiseMoments, similarities
from kinship_service.server import metrics
from kinship_service.state.backend import open_cache_store

log = logging.getLogger("kinship.registry")

CACHE_WRITE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
"""What a failing cache write raises (disk full, database locked too long)."""

__all__ = ["CheckpointLike", "FingerprintObserver", "KinshipCache", "KinshipOutcome", "Registration"]


@dataclass
class KinshipOutcome:
    """What `KinshipCache.kinship` answers: the result, how it was obtained, and the identities."""

    result: ExactKinship
    mode_used: ModeUsed
    """`exact` or `fingerprint`."""
    source: str
    """`pass` (weights read), `pairs` (pair results), `deltas` (stored deltas) or `fingerprints`."""
    identities: list[str]
    base_identity: str


@dataclass
class _Query:
    """A kinship request resolved and planned: what every step of the answer chain reads."""

    mode: KinshipMode
    per_layer: bool
    leading_slice: bool
    base: Resolved
    models: list[Resolved]
    plan: ComparisonPlan
    started: float
    sign_conflict: bool = False

    @property
    def ids(self) -> list[str]:
        return [r.ident.identity for r in self.models]

    @property
    def idents(self) -> list[CheckpointIdentity]:
        return [r.ident for r in self.models]


_MODE_USED: dict[str, Any] = {}
"""kinship_mode_used_total's series by mode, each bound on first use (counted on every Kinship call)."""


def record_exact_pass(result: ExactKinship) -> None:
    """Count a pass over weights in the metrics (bytes read, tensors and elements compared, seconds)."""
    metrics.BYTES_READ.inc(result.bytes_read)
    metrics.TENSORS_COMPARED.inc(len(result.plan.tensors))
    metrics.ELEMENTS_COMPARED.inc(result.overall.count)
    metrics.EXACT_SECONDS.labels(result.device).observe(result.seconds)
    if result.seconds > 0:
        metrics.EXACT_BYTES_PER_SECOND.set(result.bytes_read / result.seconds)


class KinshipCache:
    """Cache-backed kinship and registration (one per server; thread-safe)."""

    def __init__(self, settings: Settings, device: torch.device | str = "cpu", store: CacheStore | None = None) -> None:
        self.settings = settings
        self.device = torch.device(device)
        try:
            self.store = store if store is not None else open_cache_store(settings)
        except (OSError, sqlite3.Error) as exc:
            raise RuntimeError(
                f"cannot open the cache in {settings.cache_dir} ({exc}); set KINSHIP_CACHE_DIR to a writable directory"
            ) from None
        self.identities = IdentityResolver()
        self.resolver = Resolver(settings, self.identities, HubRecords(self.store))
        self.fingerprints = FingerprintCache(self.store)
        self.deltas = DeltaStore(self.store)
        self.pairs = PairResults(self.store)
        self.sign_conflicts = SignConflicts(self.store)
        self.plans = PlanMemo()

    def close(self) -> None:
        self.store.close()

    def _resolve(self, item: CheckpointLike, field_name: str) -> Checkpoint:
        return self.resolver.checkpoint(item, field_name)

    def get_fingerprint(self, base_id: str, ckpt_id: str) -> Fingerprint | None:
        """The cached fingerprint of a checkpoint against a base, or None."""
        return self.fingerprints.get(base_id, ckpt_id)

    def forget_memory(self) -> None:
        """Drop the in-process fingerprint copies and plans (tests; the disk cache is untouched)."""
        self.fingerprints.forget_memory()
        self.plans.clear()

    # -- Kinship ---------------------------------------------------------------------------
    def _query(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        mode: KinshipMode,
        leading_slice: bool,
        per_layer: bool,
        sign_conflict: bool = False,
    ) -> _Query:
        """Validate, resolve and plan a kinship request (InvalidArgument, NotFound, PermissionDenied, ...)."""
        started = time.perf_counter()
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}; use one of {', '.join(MODES)}", field="mode")
        if sign_conflict and mode == FINGERPRINT:
            raise InvalidArgument(
                "sign conflict is measured by the exact pass (a fingerprint does not keep the signs of single "
                "coordinates); use mode EXACT or AUTO with sign_conflict",
                field="sign_conflict",
            )
        if len(models) < 2:
            raise InvalidArgument(f"kinship needs at least two models, got {len(models)}", field="models")
        base_r = self.resolver.resolve(base, "base")
        model_rs = [self.resolver.resolve(m, f"models[{i}]") for i, m in enumerate(models)]
        labels = [r.label for r in (base_r, *model_rs)]
        plan = self.plans.plan([base_r.ident, *(r.ident for r in model_rs)], labels, leading_slice)
        if not plan.tensors:
            raise no_common_tensors()  # the exact pass's error, without reading any weights
        return _Query(mode, per_layer, leading_slice, base_r, model_rs, plan, started, sign_conflict)

    def _outcome(self, query: _Query, result: ExactKinship, mode_used: ModeUsed, source: str) -> KinshipOutcome:
        result.seconds = time.perf_counter() - query.started
        series = _MODE_USED.get(mode_used)
        if series is None:
            series = _MODE_USED[mode_used] = metrics.KINSHIP_MODE_USED.labels(mode_used)
        series.inc()
        if source == "pass":  # weights were read (counted once, however many callers share the pass)
            record_exact_pass(result)
        return KinshipOutcome(result, mode_used, source, query.ids, query.base.ident.identity)

    def _from_fingerprints(self, query: _Query) -> KinshipOutcome | None:
        facts = self.plans.facts(query.plan)
        fps, missing = usable_fingerprints(self.fingerprints, query.base.ident.identity, query.ids, facts)
        if missing:
            return None
        return self._outcome(query, from_fingerprints(fps, query.plan, facts, query.models), FINGERPRINT, "fingerprints")

    def _fingerprint_answer(self, query: _Query) -> KinshipOutcome:
        """FINGERPRINT mode: the estimate, or FAILED_PRECONDITION (FINGERPRINT_MISSING) naming the models without one."""
        facts = self.plans.facts(query.plan)
        fps, missing = usable_fingerprints(self.fingerprints, query.base.ident.identity, query.ids, facts)
        if missing:
            names = ", ".join(f"models[{i}] ({query.models[i].label})" for i in missing)
            raise FailedPrecondition(
                f"no usable fingerprint of {names} against this base over the compared tensors; call "
                "RegisterCheckpoint for it (or run one EXACT request), or use mode EXACT or AUTO",
                reason="FINGERPRINT_MISSING",
            )
        return self._outcome(query, from_fingerprints(fps, query.plan, facts, query.models), FINGERPRINT, "fingerprints")

    def _from_pairs(self, query: _Query) -> KinshipOutcome | None:
        facts = self.plans.facts(query.plan)
        result = self.pairs.answer(query.base.ident.identity, query.ids, query.plan, facts, self.device)
        return self._outcome(query, result, EXACT, "pairs") if result is not None else None

    def _manifests(self, query: _Query) -> list[Manifest] | None:
        """The stored-delta manifests of every model over exactly the planned tensors, or None (then no delta pass)."""
        facts = self.plans.facts(query.plan)
        if facts.sliced:
            return None
        return self.deltas.manifests(query.base.ident.identity, query.ids, tensor_list(query.plan))

    def kinship(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        *,
        mode: KinshipMode = AUTO,
        leading_slice: bool = False,
        per_layer: bool = False,
        sign_conflict: bool = False,
        check_cancelled: Callable[[], None] = lambda: None,
    ) -> KinshipOutcome:
        """Kinship of `models` against `base` in `mode` (exact, fingerprint or auto); see the module docstring.

        `sign_conflict`: also the pairs' sign conflict (`kinship/sign_conflict.py`), from the cache
        when stored for every pair, else from a full pass over the weights (EXACT or AUTO only).
        """
        query = self._query(base, models, mode, leading_slice, per_layer, sign_conflict)
        if mode == FINGERPRINT:
            return self._fingerprint_answer(query)
        if sign_conflict:
            stored = self._stored_sign_conflict(query)
            if stored is None:
                return self._outcome(query, self._full_pass(query, check_cancelled), EXACT, "pass")
            outcome = self._exact_chain(query, check_cancelled)
            outcome.result.sign_conflict = stored
            return outcome
        return self._exact_chain(query, check_cancelled)

    def _stored_sign_conflict(self, query: _Query) -> list[list[float]] | None:
        return self.sign_conflicts.get(query.base.ident.identity, query.ids, query.plan)

    def _exact_chain(self, query: _Query, check_cancelled: Callable[[], None]) -> KinshipOutcome:
        """EXACT/AUTO: stored pair results, else stored deltas, else (AUTO) fingerprints, else a full pass."""
        mode, per_layer = query.mode, query.per_layer
        cached = self._from_pairs(query)
        if cached is not None:
            return cached
        manifests = self._manifests(query)
        if manifests is not None:
            from_deltas = self._from_deltas(query, manifests, check_cancelled)
            if from_deltas is not None:
                return self._outcome(query, from_deltas, EXACT, "deltas")
        if mode == AUTO and not per_layer and not query.sign_conflict:  # sign conflict: exact values throughout
            estimated = self._from_fingerprints(query)
            if estimated is not None:
                return estimated
        result = self._full_pass(query, check_cancelled)
        return self._outcome(query, result, EXACT, "pass")

    def cached_kinship(
        self,
        base: CheckpointLike,
        models: Sequence[CheckpointLike],
        *,
        mode: KinshipMode = AUTO,
        leading_slice: bool = False,
        per_layer: bool = False,
        sign_conflict: bool = False,
    ) -> KinshipOutcome | None:
        """`kinship` as far as the cache answers without a pass: the outcome, or None where a pass is needed.

        Never reads weights or stored deltas (only headers, to identify the checkpoints).
        None when `kinship` would pass over stored deltas (they give exact values, so
        AUTO does not settle for fingerprints then) or over the weights. Errors are the
        ones `kinship` raises for the same request.
        """
        query = self._query(base, models, mode, leading_slice, per_layer, sign_conflict)
        if mode == FINGERPRINT:
            return self._fingerprint_answer(query)
        stored = self._stored_sign_conflict(query) if sign_conflict else None
        if sign_conflict and stored is None:
            return None  # a full pass over the weights
        cached = self._from_pairs(query)
        if cached is not None:
            cached.result.sign_conflict = stored
            return cached
        if self._manifests(query) is not None:
            return None  # a pass over the stored deltas
        if mode == AUTO and not per_layer and not sign_conflict:
            return self._from_fingerprints(query)
        return None  # a pass over the weights

    def _from_deltas(self, query: _Query, manifests: Sequence[Manifest], check_cancelled: Callable[[], None]) -> ExactKinship | None:
        """Exact kinship from stored deltas alone (the same float64 task vectors; the base is not read), or None."""
        started = time.perf_counter()
        try:
            found = self.deltas.moments(
                query.base.ident.identity,
                query.ids,
                query.plan,
                manifests,
                chunk_bytes=self.settings.chunk_bytes,
                device=self.device,
                check_cancelled=check_cancelled,
            )
        except DeltaUnavailable as exc:
            log.info("stored delta incomplete, falling back to reading the weights", extra={"detail": str(exc)})
            return None
        total = PairwiseMoments(len(query.models), device=self.device)
        for group_moments in found.moments.values():
            total.merge(group_moments)
        result = kinship_result(
            similarities(total),
            {g: similarities(m) for g, m in found.moments.items()},
            found.tensors_by_group,
            query.plan,
            self.device,
            check=query.models,
            seconds=time.perf_counter() - started,
        )
        try:
            self.pairs.put(query.base.ident.identity, query.ids, query.plan, result)
        except CACHE_WRITE_ERRORS as exc:
            log.warning("could not store results in the cache", extra={"error": repr(exc)})
        return result

    def _full_pass(self, query: _Query, check_cancelled: Callable[[], None]) -> ExactKinship:
        base_ckpt, *model_ckpts = self.resolver.files_needed([query.base, *query.models], "exact results for this request")
        base_ident, idents, plan = query.base.ident, query.idents, query.plan
        eligible = [
            self.plans.canonical(plan, base_ident, ident) and not self.fingerprints.stored(base_ident.identity, ident.identity)
            for ident in idents
        ]
        observer = FingerprintObserver(len(idents), self.device) if any(eligible) else None
        signs = SignConflictObserver(len(idents), self.device) if query.sign_conflict else None
        observers: list[FingerprintObserver | SignConflictObserver] = [o for o in (observer, signs) if o is not None]
        try:
            result = self._exact_pass(
                base_ckpt,
                model_ckpts,
                leading_slice=query.leading_slice,
                chunk_bytes=self.settings.chunk_bytes,
                check_cancelled=check_cancelled,
                observers=observers,
                stats=ReadStats(),
                use_cpu_kernel=self.settings.cpu_kernel,
                headers=[base_ident.headers, *(ident.headers for ident in idents)],
                plan=plan,
            )
        except KinshipError:
            self.resolver.raise_if_changed([base_ckpt, *model_ckpts], [base_ident, *idents])  # the real cause
            raise
        # A file rewritten or truncated during the pass: the numbers mix two versions; say so.
        self.resolver.raise_if_changed([base_ckpt, *model_ckpts], [base_ident, *idents])
        if signs is not None:
            result.sign_conflict = signs.fractions()
        try:
            if signs is not None and result.sign_conflict is not None:
                self.sign_conflicts.put(base_ident.identity, query.ids, plan, result.sign_conflict)
            if observer is not None:
                observer.flush()
                skipped = [skipped_tuples(self.plans.pair_plan(base_ident, ident).skipped) for ident in idents]
                fps = build_fingerprints(observer.sketch.sketch, observer.stats, tensor_list(plan), skipped)
                for i, ident in enumerate(idents):
                    if eligible[i]:
                        self.fingerprints.put(base_ident.identity, ident.identity, fps[i])
            self.pairs.put(base_ident.identity, query.ids, plan, result)
        except CACHE_WRITE_ERRORS as exc:  # the answer stands; only the warming failed
            log.warning("could not store results in the cache", extra={"error": repr(exc)})
        return result

    def _exact_pass(self, base: Checkpoint, models: Sequence[Checkpoint], **options: Any) -> ExactKinship:
        """The pass over the weights: on this node, or split across the Ray cluster when KINSHIP_RAY_ADDRESS is set."""
        if not self.settings.ray_address:
            return exact_kinship(base, models, device=self.device, **options)
        from kinship_service.distributed.exact_pass import distributed_exact_kinship

        return distributed_exact_kinship(
            base,
            models,
            device=self.settings.device,
            tasks=self.settings.ray_pass_tasks,
            timeout=self.settings.ray_timeout_seconds,
            **options,
        )

    # -- the KinshipBackend seams of population.pairwise_kinship ------------------------------
    def compute(
        self, base: CheckpointLike, models: Sequence[CheckpointLike], mode: KinshipMode, check_cancelled: Callable[[], None]
    ) -> tuple[ExactKinship, ModeUsed]:
        """Kinship of `models` in `mode`, and the mode used (`population.KinshipBackend`)."""
        outcome = self.kinship(base, models, mode=mode, check_cancelled=check_cancelled)
        return outcome.result, outcome.mode_used

    def cached_compute(
        self, base: CheckpointLike, models: Sequence[CheckpointLike], mode: KinshipMode
    ) -> tuple[ExactKinship, ModeUsed] | None:
        """`compute` from the cache alone, or None where a pass is needed (`population.CachedKinshipBackend`)."""
        outcome = self.cached_kinship(base, models, mode=mode)
        return (outcome.result, outcome.mode_used) if outcome is not None else None

    # -- stored deltas ------------------------------------------------------------------------
    def read_delta(self, base: CheckpointLike, checkpoint: CheckpointLike) -> Iterator[tuple[str, Iterator[EncodedChunk]]]:
        """Stream a registered checkpoint's stored delta back, tensor by tensor (chunks of EncodedChunk).

        Pair with `delta.reconstruct(chunk, base_chunk_float64)` to rebuild the weights bit for bit.
        Raises FailedPrecondition when the checkpoint is not registered against this base.
        """
        base_ident = self.resolver.resolve(base, "base").ident
        ident = self.resolver.resolve(checkpoint, "checkpoint").ident
        yield from self.deltas.read(base_ident.identity, ident.identity)

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
        base_r = self.resolver.resolve(base, "base")
        ckpt_r = self.resolver.resolve(checkpoint, "checkpoint")
        base_ident, ident = base_r.ident, ckpt_r.ident
        plan = self.plans.plan([base_ident, ident], [base_r.label, ckpt_r.label], False)
        if not plan.tensors:
            raise InvalidArgument(
                f"{ckpt_r.label} shares no floating tensor of one shape with the base {base_r.label}; "
                "check that it was fine-tuned from this base",
                reason="NO_COMMON_TENSORS",
                field="checkpoint",
            )
        fp = self.fingerprints.get(base_ident.identity, ident.identity)
        manifest = self.deltas.manifest(base_ident.identity, ident.identity)
        if fp is not None and (
            not self.deltas.storable(plan)
            or (manifest is not None and self.deltas.complete(base_ident.identity, ident.identity, manifest))
        ):
            return registration(base_ident, ident, fp, manifest, True, started, 0)
        stats = ReadStats()
        base_ckpt, ckpt = self.resolver.files_needed([base_r, ckpt_r], "complete registration for it")
        stores = RegistrationStores(self.deltas, self.fingerprints, self.resolver)
        try:
            fp, manifest = register_pass(
                base_ckpt, ckpt, base_ident, ident, plan, stores,
                device=self.device, stats=stats, check_cancelled=check_cancelled, use_cpu_kernel=self.settings.cpu_kernel,
            )  # fmt: skip
        except CACHE_WRITE_ERRORS as exc:
            raise Unavailable(
                f"the cache in {self.settings.cache_dir} could not store the registration ({exc}); free disk space "
                "or raise KINSHIP_CACHE_SIZE_LIMIT below the free space, then retry",
                reason="CACHE_WRITE_FAILED",
            ) from None
        return registration(base_ident, ident, fp, manifest, False, started, stats.total_bytes)

    # -- matrices from fingerprints -----------------------------------------------------------
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
        base_ident = self.resolver.resolve(base, "base").ident
        fps: list[Fingerprint] = []
        for i, c in enumerate(checkpoints):
            ident = self.resolver.resolve(c, f"checkpoints[{i}]").ident
            fp = self.fingerprints.get(base_ident.identity, ident.identity)
            if fp is None or (fps and not fp.comparable_with(fps[0])):
                return None
            fps.append(fp)
        if not fps:
            return []
        sims = estimate(fps)
        matrix: list[list[float]] = getattr(sims, metric)
        return matrix
