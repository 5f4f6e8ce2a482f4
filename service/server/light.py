"""Cache-only answers for the front process: Kinship, RankCandidates and ShouldStop without heavy work.

Each answerer validates its request exactly as the servicer does (`kinship_rpc`,
`recommend_rpc`), then answers from the cache alone: the response, or None when the
answer needs heavy work (a pass over stored deltas or weights), which the front then
forwards to the heavy-work process. Bad input raises the KinshipError the heavy path
would raise for the same request; the front turns it into the same rich status.

Answered here: FINGERPRINT Kinship; EXACT / AUTO Kinship from stored pair results
(AUTO also from fingerprints); RankCandidates / ShouldStop whose top-k kinship values
are all given, or come from fingerprints, or (EXACT / AUTO) from the cache as above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from kinship_client.v1 import kinship_pb2, recommend_pb2
from kinship_service.cache.registry import KinshipCache
from kinship_service.config import Settings
from kinship_service.guidance.population import Pair
from kinship_service.kinship.modes import ModeUsed
from kinship_service.kinship.population import cached_pairwise_kinship
from kinship_service.server import kinship_rpc, recommend_rpc
from kinship_service.server.recommend_rpc import PopulationQuery


@dataclass(frozen=True)
class LightMethod:
    """An RPC the front can answer: its request message and its cache-only answerer."""

    request_class: type[Message]
    answer: Callable[[Any], Message | None]


class LightAnswers:
    """The front's cache-only answerers over its own KinshipCache (thread-safe)."""

    def __init__(self, settings: Settings, cache: KinshipCache) -> None:
        self.settings = settings
        self.cache = cache

    def methods(self) -> dict[str, LightMethod]:
        """The RPCs answered here, by method name; every other RPC is forwarded as it is."""
        return {
            "Kinship": LightMethod(kinship_pb2.KinshipRequest, self.kinship),
            "RankCandidates": LightMethod(recommend_pb2.RankCandidatesRequest, self.rank_candidates),
            "ShouldStop": LightMethod(recommend_pb2.ShouldStopRequest, self.should_stop),
        }

    def kinship(self, request: kinship_pb2.KinshipRequest) -> kinship_pb2.KinshipResponse | None:
        """Kinship from fingerprints (FINGERPRINT) or stored results (EXACT, AUTO), or None: forward."""
        query = kinship_rpc.kinship_query(request)
        outcome = self.cache.cached_kinship(
            query.base, query.models, mode=query.mode, leading_slice=query.leading_slice, per_layer=query.per_layer
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

    def rank_candidates(self, request: recommend_pb2.RankCandidatesRequest) -> recommend_pb2.RankCandidatesResponse | None:
        """RankCandidates when its kinship values are given or cached, or None: forward."""
        query = recommend_rpc.rank_query(request)
        found = self._top_k_kinship(query.kinship)
        return query.response(*found) if found is not None else None

    def should_stop(self, request: recommend_pb2.ShouldStopRequest) -> recommend_pb2.ShouldStopResponse | None:
        """ShouldStop when its kinship values are given or cached, or None: forward."""
        query = recommend_rpc.stop_query(request)
        found = self._top_k_kinship(query.kinship)
        return query.response(*found) if found is not None else None
