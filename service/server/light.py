"""Cache-only answers for the front process: Kinship, RankCandidates and ShouldStop without heavy work.

Each request is validated exactly as the servicer does (`kinship_rpc`, `recommend_rpc`;
the validated query kept by its bytes in `QueryMemo`), then answered from the cache
alone: the response, or None when the answer needs heavy work (a pass over stored deltas or weights), which the front then
forwards to the heavy-work process. Bad input raises the KinshipError the heavy path
would raise for the same request; the front turns it into the same rich status.

Answered here: FINGERPRINT Kinship; EXACT / AUTO Kinship from stored pair results
(AUTO also from fingerprints); RankCandidates / ShouldStop whose top-k kinship values
are all given, or come from fingerprints, or (EXACT / AUTO) from the cache as above.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from kinship_client.v1 import kinship_pb2, recommend_pb2
from kinship_service.cache.registry import KinshipCache
from kinship_service.config import Settings
from kinship_service.guidance.population import Pair
from kinship_service.kinship.modes import FINGERPRINT, ModeUsed
from kinship_service.kinship.population import cached_pairwise_kinship
from kinship_service.server import kinship_rpc, recommend_rpc
from kinship_service.server.kinship_rpc import KinshipQuery
from kinship_service.server.recommend_rpc import PopulationQuery, RankQuery, StopQuery


@dataclass(frozen=True)
class LightMethod:
    """An RPC the front can answer: its request message, its validation and its cache-only answerer."""

    request_class: type[Message]
    validate: Callable[[Any], Any]
    """The request as its validated query (the KinshipError the heavy path raises for bad input); pure."""
    answer: Callable[[Any], Message | None]
    """The response to a validated query from the cache alone, or None: forward the call."""


def memory_only(query: KinshipQuery | RankQuery | StopQuery) -> bool:
    """Whether a validated light query is answered from memory alone (inline on the event loop).

    FINGERPRINT mode reads fingerprints the front keeps in memory (after the first use of each);
    a population without a base can only use the kinship values it carries. Anything else may
    look up stored pair results and delta manifests first.
    """
    if isinstance(query, KinshipQuery):
        return query.mode == FINGERPRINT
    return query.kinship.mode == FINGERPRINT or query.kinship.base is None


@dataclass(frozen=True)
class Prepared:
    """A parsed and validated light request."""

    query: Any
    memory_only: bool


class QueryMemo:
    """Validated queries by method and request bytes: a bounded LRU, used by the event loop alone (no lock).

    Parsing and validating a request is a pure function of its bytes (no file is looked at:
    references are resolved, and files stat-ed, by the answer); a ShouldStop carrying 120 kinship
    values spends most of its CPU there. A request seen before skips both; its answer is computed
    afresh from the cache and the files as they are now, every time. Invalid requests are not kept.
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 8 << 20) -> None:
        self._entries: OrderedDict[tuple[str, bytes], Prepared] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def get(self, method: str, raw: bytes) -> Prepared | None:
        key = (method, raw)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, method: str, raw: bytes, prepared: Prepared) -> None:
        if len(raw) > self._max_bytes // 64:  # a huge request would push out many small ones
            return
        key = (method, raw)
        if key not in self._entries:
            self._bytes += len(raw)
        self._entries[key] = prepared
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            (_, dropped), _ = self._entries.popitem(last=False)
            self._bytes -= len(dropped)


class LightAnswers:
    """The front's cache-only answerers over its own KinshipCache (thread-safe)."""

    def __init__(self, settings: Settings, cache: KinshipCache) -> None:
        self.settings = settings
        self.cache = cache

    def methods(self) -> dict[str, LightMethod]:
        """The RPCs answered here, by method name; every other RPC is forwarded as it is."""
        return {
            "Kinship": LightMethod(kinship_pb2.KinshipRequest, kinship_rpc.kinship_query, self.kinship),
            "RankCandidates": LightMethod(recommend_pb2.RankCandidatesRequest, recommend_rpc.rank_query, self.rank_candidates),
            "ShouldStop": LightMethod(recommend_pb2.ShouldStopRequest, recommend_rpc.stop_query, self.should_stop),
        }

    def kinship(self, query: KinshipQuery) -> kinship_pb2.KinshipResponse | None:
        """Kinship from fingerprints (FINGERPRINT) or stored results (EXACT, AUTO), or None: forward."""
        outcome = self.cache.cached_kinship(
            query.base,
            query.models,
            mode=query.mode,
            leading_slice=query.leading_slice,
            per_layer=query.per_layer,
            sign_conflict=query.sign_conflict,
        )
        return kinship_rpc.kinship_response(outcome, per_layer=query.per_layer) if outcome is not None else None

    def _top_k_kinship(self, query: PopulationQuery) -> tuple[dict[Pair, float], ModeUsed] | None:
        return cached_pairwise_kinship(
            self.settings.allowed_roots,
            query.base,
            query.members,
            query.metric,
            query.mode,
            query.known,
            self.cache.cached_compute,
            pairs=query.pairs,
        )

    def rank_candidates(self, query: RankQuery) -> recommend_pb2.RankCandidatesResponse | None:
        """RankCandidates when its kinship values are given or cached, or None: forward."""
        if query.can_measure_sign_conflict:
            return None  # method advice measures sign conflict: the heavy process answers (from the cache when stored)
        found = self._top_k_kinship(query.kinship)
        return query.response(*found) if found is not None else None

    def should_stop(self, query: StopQuery) -> recommend_pb2.ShouldStopResponse | None:
        """ShouldStop when its kinship values are given or cached, or None: forward."""
        found = self._top_k_kinship(query.kinship)
        return query.response(*found) if found is not None else None
