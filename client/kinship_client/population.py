"""Merging populations for RankCandidates and ShouldStop: members, the population file, typed results.

A population file (JSON always; YAML when PyYAML is installed) describes the models a
merging loop has so far; `docs/population.md` documents the format:

    base: /models/base
    top_k: 3
    members:
      - {name: metamath, checkpoint: /models/metamath, score: 63.72, generation: 0}
      - {name: model-1-1, checkpoint: /models/m11, score: 62.17, generation: 1, parents: [metamath, instruct]}
    merged_pairs: [[metamath, instruct]]
    known_kinship: [{pair: [metamath, instruct], value: 0.01}]
    previous_top_k: [metamath, open-chat, instruct]

Only grpcio and protobuf are needed (PyYAML is optional).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import (
    METRIC_NAMES,
    MODE_USED_NAMES,
    RECOMMENDATION_KIND_NAMES,
    STOP_REASON_NAMES,
    Metric,
    ModeUsed,
    RecommendationKind,
    StopReason,
    received,
)
from .v1 import recommend_pb2

KnownKinshipLike = Mapping[tuple[str, str], float] | Iterable[tuple[str, str, float]]
"""Kinship values already known: `{(a, b): value}` or `[(a, b, value), ...]`."""


@dataclass(frozen=True)
class Member:
    """One model of a merging population.

    `checkpoint` is a server path or `hf://owner/name[@revision]` (None when every kinship
    value it needs is sent as known kinship); `score` its evaluation score (the service
    never evaluates); `generation` 0 for foundation models; `parents` the members it was
    merged from; `task_scores` optional per-task scores (for complementarity: give them for
    every member or none, all of one length).
    """

    name: str
    score: float | None = None
    checkpoint: str | None = None
    generation: int | None = None
    parents: tuple[str, ...] = ()
    task_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class Population:
    """The contents of a population file."""

    members: list[Member]
    base: str | None = None
    top_k: int | None = None
    merged_pairs: list[tuple[str, str]] = field(default_factory=list)
    known_kinship: list[tuple[str, str, float]] = field(default_factory=list)
    previous_top_k: list[str] = field(default_factory=list)


class PopulationFileError(ValueError):
    """A population file cannot be read or does not have the documented shape."""


@dataclass(frozen=True)
class KinshipMatrix:
    """A square kinship matrix between named members."""

    names: list[str]
    values: list[list[float]]
    metric: Metric

    def value(self, a: str, b: str) -> float:
        """The kinship of members `a` and `b` (raises ValueError when either is not in `names`)."""
        return self.values[self.names.index(a)][self.names.index(b)]

    @classmethod
    def from_proto(cls, message: recommend_pb2.KinshipMatrix) -> KinshipMatrix:
        """The KinshipMatrix of a proto (row-major values)."""
        n = len(message.names)
        flat = list(message.values)
        return cls(
            names=list(message.names),
            values=[flat[i * n : (i + 1) * n] for i in range(n)],
            metric=received(METRIC_NAMES, message.metric, "metric"),
        )


@dataclass(frozen=True)
class MemberGain:
    """Merge gain of a merged member: its score minus the mean of its parents' scores."""

    name: str
    gain: float
    generation: int | None

    @classmethod
    def from_proto(cls, message: recommend_pb2.MemberGain) -> MemberGain:
        """The MemberGain of a proto."""
        return cls(message.name, message.gain, message.generation if message.HasField("generation") else None)


@dataclass(frozen=True)
class GainModel:
    """The merge-gain model fitted on the population's history (see docs/population.md).

    expected gain = intercept + kinship_slope * (relatedness - kinship_center)
                    + score_gap_slope * (score_gap - score_gap_center)
    """

    history: int
    skipped: int
    intercept: float
    kinship_slope: float
    score_gap_slope: float
    kinship_center: float
    score_gap_center: float
    prior_strength: float

    @classmethod
    def from_proto(cls, message: recommend_pb2.GainModel) -> GainModel:
        """The GainModel of a proto."""
        return cls(
            message.history,
            message.skipped,
            message.intercept,
            message.kinship_slope,
            message.score_gap_slope,
            message.kinship_center,
            message.score_gap_center,
            message.prior_strength,
        )


def _optional(message: Any, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


@dataclass(frozen=True)
class Recommendation:
    """A recommended merge: `kind` is `greedy` or `exploration`.

    The optional numbers are set when the request asked for them: `expected_gain` and
    `expected_score` (estimate_gain or the expected_score order), `complementarity` and
    `task_ceiling` (members with task scores), `suggested_t` (slerp_factor: the weight of
    `second`).
    """

    first: str
    second: str
    kind: RecommendationKind
    kinship: float
    mean_score: float
    reason: str
    expected_gain: float | None = None
    expected_score: float | None = None
    complementarity: float | None = None
    task_ceiling: float | None = None
    suggested_t: float | None = None

    @classmethod
    def from_proto(cls, message: recommend_pb2.Recommendation) -> Recommendation:
        """The Recommendation of a proto."""
        return cls(
            message.pair.first,
            message.pair.second,
            received(RECOMMENDATION_KIND_NAMES, message.kind, "recommendation kind"),
            message.kinship,
            message.mean_score,
            message.reason,
            _optional(message, "expected_gain"),
            _optional(message, "expected_score"),
            _optional(message, "complementarity"),
            _optional(message, "task_ceiling"),
            _optional(message, "suggested_t"),
        )


@dataclass(frozen=True)
class RankResult:
    """The answer of RankCandidates. `mode` is `exact`, `fingerprint` or `unspecified` (all values known)."""

    recommendations: list[Recommendation]
    top_k: list[str]
    matrix: KinshipMatrix
    gains: list[MemberGain]
    mode: ModeUsed
    raw: recommend_pb2.RankCandidatesResponse = field(repr=False)
    gain_model: GainModel | None = None
    """Set when the request asked for gain estimates."""

    @property
    def greedy(self) -> list[Recommendation]:
        """The greedy recommendations, in order."""
        return [r for r in self.recommendations if r.kind == "greedy"]

    @property
    def exploration(self) -> Recommendation | None:
        """The exploration recommendation, if any."""
        return next((r for r in self.recommendations if r.kind == "exploration"), None)

    @classmethod
    def from_proto(cls, message: recommend_pb2.RankCandidatesResponse) -> RankResult:
        """The RankResult of a RankCandidatesResponse."""
        return cls(
            recommendations=[Recommendation.from_proto(r) for r in message.recommendations],
            top_k=list(message.top_k),
            matrix=KinshipMatrix.from_proto(message.matrix),
            gains=[MemberGain.from_proto(g) for g in message.gains],
            mode=received(MODE_USED_NAMES, message.mode_used, "kinship mode"),
            raw=message,
            gain_model=GainModel.from_proto(message.gain_model) if message.HasField("gain_model") else None,
        )


@dataclass(frozen=True)
class StopResult:
    """The answer of ShouldStop. `reasons` are `kinship_saturated`, `topk_unchanged`, `gain_plateau`, `no_expected_gain`."""

    stop: bool
    reasons: list[StopReason]
    top_k: list[str]
    aggregated_kinship: float
    kinship_threshold: float
    matrix: KinshipMatrix
    recent_gains: list[MemberGain]
    summary: str
    mode: ModeUsed
    raw: recommend_pb2.ShouldStopResponse = field(repr=False)
    gain_model: GainModel | None = None
    """Set when `min_expected_gain` was given."""
    best_expected_gain: float | None = None
    """The highest expected gain of a top-k pair left to merge (with `min_expected_gain`)."""
    best_candidate: tuple[str, str] | None = None
    """That pair."""

    @classmethod
    def from_proto(cls, message: recommend_pb2.ShouldStopResponse) -> StopResult:
        """The StopResult of a ShouldStopResponse."""
        return cls(
            stop=message.stop,
            reasons=[received(STOP_REASON_NAMES, r, "stop reason") for r in message.reasons],
            top_k=list(message.top_k),
            aggregated_kinship=message.aggregated_kinship,
            kinship_threshold=message.kinship_threshold,
            matrix=KinshipMatrix.from_proto(message.matrix),
            recent_gains=[MemberGain.from_proto(g) for g in message.recent_gains],
            summary=message.summary,
            mode=received(MODE_USED_NAMES, message.mode_used, "kinship mode"),
            raw=message,
            gain_model=GainModel.from_proto(message.gain_model) if message.HasField("gain_model") else None,
            best_expected_gain=_optional(message, "best_expected_gain"),
            best_candidate=(
                (message.best_candidate.first, message.best_candidate.second) if message.HasField("best_candidate") else None
            ),
        )


def known_kinship_triples(known: KnownKinshipLike) -> list[tuple[str, str, float]]:
    """Known kinship as (first, second, value) triples, from a dict or an iterable of triples."""
    if isinstance(known, Mapping):
        return [(a, b, float(v)) for (a, b), v in known.items()]
    return [(a, b, float(v)) for a, b, v in known]


# -- population files ---------------------------------------------------------------------


def load_population(path: str | Path) -> Population:
    """Read a population file: `.json`, or `.yaml`/`.yml` (needs PyYAML); other names are tried as JSON, then YAML.

    Raises:
        PopulationFileError: the file cannot be read, is not valid JSON/YAML, or does not have the
            documented shape (the message names the file and the entry at fault).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PopulationFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _parse_json(text, path)
    elif suffix in (".yaml", ".yml"):
        data = _parse_yaml(text, path)
    else:
        try:
            data = _parse_json(text, path)
        except PopulationFileError:
            data = _parse_yaml(text, path)
    return parse_population(data, str(path))


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PopulationFileError(f"{path}: not valid JSON: {exc}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise PopulationFileError(
            f"{path}: reading YAML needs PyYAML (`pip install PyYAML`); or write the population as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PopulationFileError(f"{path}: not valid YAML: {exc}") from None


def parse_population(data: Any, source: str = "population") -> Population:
    """Check the shape of a decoded population document and build a Population.

    Only types are checked here; the server checks the meaning (unique names, finite
    scores, known parents, ...) and names the field at fault.

    Raises:
        PopulationFileError: `data` does not have the documented shape (the message names the entry).
    """
    if not isinstance(data, Mapping):
        raise PopulationFileError(f"{source}: the top level must be a mapping with a 'members' list")
    unknown = sorted(set(data) - {"base", "top_k", "members", "merged_pairs", "known_kinship", "previous_top_k"})
    if unknown:
        raise PopulationFileError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}")
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise PopulationFileError(f"{source}: 'members' must be a non-empty list")
    members = [_member(m, f"{source}: members[{i}]") for i, m in enumerate(raw_members)]
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise PopulationFileError(f"{source}: 'base' must be a path or hf://owner/name[@revision]")
    top_k = data.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise PopulationFileError(f"{source}: 'top_k' must be an integer")
    merged = [_pair(p, f"{source}: merged_pairs[{i}]") for i, p in enumerate(_list(data, "merged_pairs", source))]
    known = [_known(k, f"{source}: known_kinship[{i}]") for i, k in enumerate(_list(data, "known_kinship", source))]
    previous = _list(data, "previous_top_k", source)
    if not all(isinstance(n, str) for n in previous):
        raise PopulationFileError(f"{source}: 'previous_top_k' must be a list of member names")
    return Population(members, base, top_k, merged, known, [str(n) for n in previous])


def _list(data: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PopulationFileError(f"{source}: '{key}' must be a list")
    return value


def _member(raw: Any, where: str) -> Member:
    if not isinstance(raw, Mapping):
        raise PopulationFileError(f"{where}: must be a mapping with name, checkpoint and score")
    unknown = sorted(set(raw) - {"name", "checkpoint", "score", "generation", "parents", "task_scores"})
    if unknown:
        raise PopulationFileError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise PopulationFileError(f"{where}: 'name' must be a string")
    score = raw.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            # Strings such as "nan" or ".nan" would be silently ambiguous; numbers only.
            raise PopulationFileError(f"{where}: 'score' must be a number")
        score = float(score)
    checkpoint = raw.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise PopulationFileError(f"{where}: 'checkpoint' must be a path or hf://owner/name[@revision]")
    generation = raw.get("generation")
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise PopulationFileError(f"{where}: 'generation' must be an integer")
    parents = raw.get("parents") or []
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise PopulationFileError(f"{where}: 'parents' must be a list of member names")
    task_scores = raw.get("task_scores") or []
    if not isinstance(task_scores, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in task_scores):
        raise PopulationFileError(f"{where}: 'task_scores' must be a list of numbers")
    return Member(
        name=name,
        score=score,
        checkpoint=checkpoint,
        generation=generation,
        parents=tuple(parents),
        task_scores=tuple(float(v) for v in task_scores),
    )


def _pair(raw: Any, where: str) -> tuple[str, str]:
    if isinstance(raw, Mapping) and set(raw) == {"first", "second"}:
        raw = [raw["first"], raw["second"]]
    if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(n, str) for n in raw):
        raise PopulationFileError(f"{where}: a pair is [name, name] or {{first: name, second: name}}")
    return (raw[0], raw[1])


def _known(raw: Any, where: str) -> tuple[str, str, float]:
    if isinstance(raw, Mapping):
        if set(raw) != {"pair", "value"}:
            raise PopulationFileError(f"{where}: known kinship is {{pair: [name, name], value: number}}")
        first, second = _pair(raw["pair"], where)
        value = raw["value"]
    elif isinstance(raw, list) and len(raw) == 3:
        first, second = _pair(raw[:2], where)
        value = raw[2]
    else:
        raise PopulationFileError(f"{where}: known kinship is {{pair: [name, name], value: number}} or [name, name, number]")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PopulationFileError(f"{where}: 'value' must be a number")
    return (first, second, float(value))


def population_to_json(population: Population) -> dict[str, Any]:
    """A population as a JSON-ready document in the file format (the inverse of `parse_population`)."""

    def member(m: Member) -> dict[str, Any]:
        out: dict[str, Any] = {"name": m.name}
        if m.checkpoint is not None:
            out["checkpoint"] = m.checkpoint
        if m.score is not None:
            out["score"] = m.score
        if m.generation is not None:
            out["generation"] = m.generation
        if m.parents:
            out["parents"] = list(m.parents)
        if m.task_scores:
            out["task_scores"] = list(m.task_scores)
        return out

    doc: dict[str, Any] = {}
    if population.base is not None:
        doc["base"] = population.base
    if population.top_k is not None:
        doc["top_k"] = population.top_k
    doc["members"] = [member(m) for m in population.members]
    if population.merged_pairs:
        doc["merged_pairs"] = [list(p) for p in population.merged_pairs]
    if population.known_kinship:
        doc["known_kinship"] = [{"pair": [a, b], "value": v} for a, b, v in population.known_kinship]
    if population.previous_top_k:
        doc["previous_top_k"] = list(population.previous_top_k)
    return doc

