"""The population a recommendation is made for: members, their validation, top-k, gains and merged pairs.

Hu et al., "Exploring Model Kinship for Merging Large Language Models" (arXiv 2410.12613).
Pure functions, no gRPC, no I/O: kinship values come in through a lookup (`KinshipLookup`,
a callable `(name_a, name_b) -> value`), so `rank.py` and `stop.py` run on numbers alone,
for example the paper's own Table 2.

The rules, in one place:

- **Validation** (`validate_population`, `validate_pairs`, `validate_known`,
  `validate_previous_top_k`, `resolve_threshold`): every problem is an `InvalidArgument`
  naming the request field at fault, e.g. `members[3].score` or `top_k`.
- **Merge gain** (eq. 5): `score - mean(parent scores)` for every member with parents.
- **Top-k**: members by score, descending; equal scores by name (Unicode code points,
  ascending), so the result does not depend on the order of the population.
- **Already merged**: the pairs the caller lists, plus the parents of every two-parent
  member (merging them again would reproduce that member).
- **"Lower kinship"** means less related: lower PCC or cosine, but a *larger* Euclidean
  distance. Sorting, exploration and aggregation all follow this, see `relatedness`.
"""

from __future__ import annotations

import math
import os.path
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from kinship_service.errors import InvalidArgument

PCC = "pcc"
COSINE = "cosine"
EUCLIDEAN = "euclidean"
METRICS = (PCC, COSINE, EUCLIDEAN)

DEFAULT_KINSHIP_THRESHOLD = 0.9
"""The paper's saturation level for PCC and cosine (section 4.2)."""

Pair = tuple[str, str]
"""An unordered pair of member names in canonical (sorted) order; see `pair_key`."""
KinshipLookup = Callable[[str, str], float]
"""Kinship between two members by name, under one metric."""


def pair_key(a: str, b: str) -> Pair:
    """The canonical key of the unordered pair {a, b}."""
    return (a, b) if a <= b else (b, a)


def relatedness(value: float, metric: str) -> float:
    """A value that grows with kinship: the value itself for PCC and cosine, minus the distance for Euclidean."""
    return -value if metric == EUCLIDEAN else value


def self_kinship(metric: str) -> float:
    """The diagonal of a kinship matrix: 1 for PCC and cosine, 0 for Euclidean distance."""
    return 0.0 if metric == EUCLIDEAN else 1.0


@dataclass(frozen=True)
class Member:
    """One model of a population, as the pure logic sees it."""

    name: str
    score: float | None
    """Evaluation score (average task performance); None when the caller left it out."""
    generation: int | None = None
    """Merge generation, 0 for foundation models; None when not given."""
    parents: tuple[str, ...] = ()
    """Names of the members it was merged from."""
    checkpoint: str | None = None
    """A comparable description of its checkpoint (e.g. `path:/m/a`), used to reject the same
    checkpoint listed twice; None when the member has no checkpoint."""
    task_scores: tuple[float, ...] = ()
    """Optional per-task scores (for complementarity); empty when not given."""


@dataclass(frozen=True)
class MemberGain:
    """Merge gain of a merged member (eq. 5)."""

    name: str
    gain: float
    generation: int | None


@dataclass(frozen=True)
class KinshipMatrix:
    """A square kinship matrix between named members (row-major, symmetric)."""

    names: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    metric: str

    @classmethod
    def build(cls, names: Sequence[str], kinship: KinshipLookup, metric: str) -> KinshipMatrix:
        """Fill the matrix from a lookup (each pair looked up once; the diagonal from the metric)."""
        n = len(names)
        rows = [[self_kinship(metric)] * n for _ in range(n)]
        for i, j in combinations(range(n), 2):
            rows[i][j] = rows[j][i] = float(kinship(names[i], names[j]))
        return cls(tuple(names), tuple(tuple(r) for r in rows), metric)

    def value(self, a: str, b: str) -> float:
        """The kinship of members `a` and `b`."""
        return self.values[self.names.index(a)][self.names.index(b)]

    def pair_values(self) -> list[float]:
        """Every off-diagonal pair i < j, row-major."""
        n = len(self.names)
        return [self.values[i][j] for i, j in combinations(range(n), 2)]

    def flat(self) -> list[float]:
        """Row-major values, len(names)^2 entries."""
        return [v for row in self.values for v in row]




# -- Validation --------------------------------------------------------------------------


def validate_population(members: Sequence[Member], top_k: int, *, field: str = "members") -> dict[str, Member]:
    """Check a population and `top_k`; return the members by name.

    Rejects: fewer than two members; empty or duplicate names; the same checkpoint twice;
    missing or non-finite scores; negative generations, or generations on some members but
    not others; parents that are not members, repeated, the member itself, or (with
    generations) not of an earlier generation; `top_k` outside [2, len(members)].
    """
    if len(members) < 2:
        raise InvalidArgument(f"a population needs at least two members, got {len(members)}", field=field)
    by_name: dict[str, Member] = {}
    index_of: dict[str, int] = {}
    checkpoints: dict[str, int] = {}
    with_generation = [m.generation is not None for m in members]
    any_generation = any(with_generation)  # once: inside the loop it made validation quadratic
    for i, member in enumerate(members):
        if not member.name or not member.name.strip():
            raise InvalidArgument("every member needs a non-empty name", field=f"{field}[{i}].name")
        if member.name in by_name:
            raise InvalidArgument(
                f"duplicate member name {member.name!r} (also {field}[{index_of[member.name]}]); names must be unique",
                reason="DUPLICATE_MEMBER",
                field=f"{field}[{i}].name",
            )
        if member.checkpoint is not None:
            if member.checkpoint in checkpoints:
                raise InvalidArgument(
                    f"member {member.name!r} has the same checkpoint as {field}[{checkpoints[member.checkpoint]}]; "
                    "list each model once",
                    reason="DUPLICATE_MEMBER",
                    field=f"{field}[{i}].checkpoint",
                )
            checkpoints[member.checkpoint] = i
        if member.score is None:
            raise InvalidArgument(
                f"member {member.name!r} has no score; every member needs its evaluation score "
                "(the service never evaluates models)",
                reason="MISSING_SCORE",
                field=f"{field}[{i}].score",
            )
        if not math.isfinite(member.score):
            raise InvalidArgument(
                f"member {member.name!r} has score {member.score}; scores must be finite numbers",
                reason="NON_FINITE_SCORE",
                field=f"{field}[{i}].score",
            )
        if member.generation is not None and member.generation < 0:
            raise InvalidArgument(
                f"member {member.name!r} has generation {member.generation}; use 0 for foundation models",
                field=f"{field}[{i}].generation",
            )
        if any_generation and member.generation is None:
            first = with_generation.index(True)
            raise InvalidArgument(
                f"member {member.name!r} has no generation but {field}[{first}] has one; give it for every member or none",
                field=f"{field}[{i}].generation",
            )
        by_name[member.name] = member
        index_of[member.name] = i
    for i, member in enumerate(members):
        seen: set[str] = set()
        for k, parent in enumerate(member.parents):
            where = f"{field}[{i}].parents[{k}]"
            if parent not in by_name:
                raise InvalidArgument(
                    f"parent {parent!r} of member {member.name!r} is not in the population; add it (with its score) "
                    "or leave it out of parents",
                    reason="UNKNOWN_PARENT",
                    field=where,
                )
            if parent == member.name:
                raise InvalidArgument(f"member {member.name!r} lists itself as a parent", field=where)
            if parent in seen:
                raise InvalidArgument(f"member {member.name!r} lists parent {parent!r} twice", field=where)
            seen.add(parent)
            parent_generation = by_name[parent].generation
            if member.generation is not None and parent_generation is not None and parent_generation >= member.generation:
                raise InvalidArgument(
                    f"member {member.name!r} (generation {member.generation}) has parent {parent!r} of generation "
                    f"{parent_generation}; a parent must come from an earlier generation",
                    field=where,
                )
    validate_task_scores(members, field=field)
    validate_top_k(top_k, len(members))
    return by_name


def validate_task_scores(members: Sequence[Member], *, field: str = "members") -> None:
    """Per-task scores: on every member or none, all of one length, every entry finite."""
    given = [i for i, m in enumerate(members) if m.task_scores]
    if not given:
        return
    first = given[0]
    length = len(members[first].task_scores)
    for i, member in enumerate(members):
        if len(member.task_scores) != length:
            have = "none" if not member.task_scores else f"{len(member.task_scores)}"
            raise InvalidArgument(
                f"member {member.name!r} has {have} task scores but {field}[{first}] has {length}; "
                "give the same tasks, in the same order, for every member (or task_scores for none)",
                reason="TASK_SCORES_MISMATCH",
                field=f"{field}[{i}].task_scores",
            )
        for j, value in enumerate(member.task_scores):
            if not math.isfinite(value):
                raise InvalidArgument(
                    f"member {member.name!r} has task score {value} for task {j}; task scores must be finite numbers",
                    reason="NON_FINITE_SCORE",
                    field=f"{field}[{i}].task_scores[{j}]",
                )


MAX_TOP_K = 256
"""Largest top_k: its k (k - 1) / 2 pairs are enumerated and their kinship computed in one pass."""


def validate_top_k(top_k: int, population_size: int, *, field: str = "top_k") -> None:
    """`top_k` must be in [2, min(population_size, MAX_TOP_K)]: kinship needs a pair, and the pairs must stay countable."""
    if not 2 <= top_k <= population_size:
        raise InvalidArgument(
            f"top_k must be between 2 and the population size ({population_size}), got {top_k}",
            reason="TOP_K_OUT_OF_RANGE",
            field=field,
        )
    if top_k > MAX_TOP_K:
        raise InvalidArgument(
            f"top_k is {top_k}; at most {MAX_TOP_K} models are compared at once ({MAX_TOP_K * (MAX_TOP_K - 1) // 2} pairs)",
            reason="TOP_K_OUT_OF_RANGE",
            field=field,
        )


def validate_pairs(pairs: Sequence[tuple[str, str]], names: Iterable[str], *, field: str = "merged_pairs") -> set[Pair]:
    """Check that each pair names two different members; return the canonical pairs."""
    known = set(names)
    out: set[Pair] = set()
    for i, (first, second) in enumerate(pairs):
        out.add(_checked_pair(first, second, known, f"{field}[{i}]"))
    return out


def _checked_pair(first: str, second: str, names: set[str], where: str) -> Pair:
    for side, name in (("first", first), ("second", second)):
        if name not in names:
            raise InvalidArgument(f"{name!r} is not a member of the population", reason="UNKNOWN_MEMBER", field=f"{where}.{side}")
    if first == second:
        raise InvalidArgument(f"a pair needs two different members, got {first!r} twice", field=f"{where}.second")
    return pair_key(first, second)


def validate_known(
    known: Sequence[tuple[str, str, float]], names: Iterable[str], metric: str, *, field: str = "known_kinship"
) -> dict[Pair, float]:
    """Check caller-supplied kinship values (members exist, finite, in the metric's range, no conflicts).

    One cheap combined test per value; a value failing it goes through `_checked_known`,
    which raises the precise error.
    """
    members = set(names)
    out: dict[Pair, float] = {}
    # Finite and in range in one chained comparison (NaN and infinities fail it).
    low, high = (0.0, sys.float_info.max) if metric == EUCLIDEAN else (-1.0 - 1e-9, 1.0 + 1e-9)
    for i, (first, second, value) in enumerate(known):
        if first in members and second in members and first != second and low <= value <= high:
            key = (first, second) if first <= second else (second, first)
        else:
            key = _checked_known(i, first, second, value, members, metric, field)
        previous = out.get(key)
        if previous is not None and previous != value:
            raise InvalidArgument(
                f"pair ({first}, {second}) is given twice with different values ({previous} and {value})",
                field=f"{field}[{i}].value",
            )
        out[key] = value
    return out


def _checked_known(i: int, first: str, second: str, value: float, members: set[str], metric: str, field: str) -> Pair:
    """Every check of one known kinship value, in order: raises the first that fails, else returns the pair's key."""
    key = _checked_pair(first, second, members, f"{field}[{i}].pair")
    where = f"{field}[{i}].value"
    if not math.isfinite(value):
        raise InvalidArgument(f"kinship of ({first}, {second}) is {value}; values must be finite", field=where)
    if metric == EUCLIDEAN and value < 0:
        raise InvalidArgument(f"a Euclidean distance cannot be negative, got {value}", field=where)
    if metric != EUCLIDEAN and not -1.0 - 1e-9 <= value <= 1.0 + 1e-9:
        raise InvalidArgument(f"{metric} kinship must be in [-1, 1], got {value}", field=where)
    return key


def validate_previous_top_k(previous: Sequence[str], names: Iterable[str], *, field: str = "previous_top_k") -> None:
    """The previous top-k must name distinct members (Algorithm 1 only ever adds models)."""
    members = set(names)
    seen: set[str] = set()
    for i, name in enumerate(previous):
        if name not in members:
            raise InvalidArgument(
                f"{name!r} is not a member of the population; the previous top-k must still be in it",
                reason="UNKNOWN_MEMBER",
                field=f"{field}[{i}]",
            )
        if name in seen:
            raise InvalidArgument(f"{name!r} is listed twice", field=f"{field}[{i}]")
        seen.add(name)


def resolve_threshold(threshold: float | None, metric: str, *, field: str = "kinship_threshold") -> float:
    """The saturation threshold: 0.9 by default for PCC and cosine; required for Euclidean distance."""
    if threshold is None:
        if metric == EUCLIDEAN:
            raise InvalidArgument(
                "kinship_threshold is required with the EUCLIDEAN metric: distances have the scale of the weights, "
                "so there is no meaningful default; give the distance at or below which models count as saturated",
                field=field,
            )
        return DEFAULT_KINSHIP_THRESHOLD
    if not math.isfinite(threshold):
        raise InvalidArgument(f"kinship_threshold must be finite, got {threshold}", field=field)
    if metric == EUCLIDEAN and threshold < 0:
        raise InvalidArgument(f"a Euclidean distance threshold cannot be negative, got {threshold}", field=field)
    if metric != EUCLIDEAN and not -1.0 <= threshold <= 1.0:
        raise InvalidArgument(f"a {metric} threshold must be in [-1, 1], got {threshold}", field=field)
    return threshold


def checkpoint_description(kind: str, location: str) -> str:
    """A comparable description of a checkpoint reference for duplicate detection (`path:` paths normalised)."""
    if kind == "path":
        return "path:" + os.path.normpath(location)
    return f"{kind}:{location}"


# -- Gains, top-k, merged pairs -----------------------------------------------------------


def merge_gains(members: Sequence[Member]) -> list[MemberGain]:
    """Merge gain (eq. 5) of every member with parents, in population order."""
    scores = {m.name: m.score for m in members}
    gains = []
    for member in members:
        if not member.parents or member.score is None:
            continue
        parent_scores = [scores[p] for p in member.parents]
        if any(s is None for s in parent_scores):
            continue
        mean = math.fsum(s for s in parent_scores if s is not None) / len(parent_scores)
        gains.append(MemberGain(member.name, member.score - mean, member.generation))
    return gains


def select_top_k(members: Sequence[Member], top_k: int) -> list[str]:
    """The `top_k` best members by score, best first; equal scores ordered by name (ascending)."""
    ranked = sorted(members, key=lambda m: (-(m.score if m.score is not None else -math.inf), m.name))
    return [m.name for m in ranked[:top_k]]


def merged_pair_set(members: Sequence[Member], merged_pairs: Iterable[Pair] = ()) -> set[Pair]:
    """Pairs already merged: those given plus the parents of every two-parent member."""
    merged = {pair_key(*p) for p in merged_pairs}
    merged.update(pair_key(*m.parents) for m in members if len(m.parents) == 2)
    return merged


def top_k_pairs(names: Sequence[str]) -> list[Pair]:
    """Every pair among `names`, canonical keys: the kinship values RankCandidates and ShouldStop need."""
    return [pair_key(a, b) for a, b in combinations(names, 2)]


def lookup(values: Mapping[Pair, float]) -> KinshipLookup:
    """A KinshipLookup over a dict keyed by canonical pairs."""

    def get(a: str, b: str) -> float:
        return values[pair_key(a, b)]

    return get
