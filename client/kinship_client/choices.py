"""The closed sets of strings the client takes and returns, as `Literal` types, and their proto enums.

Each argument that takes one of a few names (a mode, a metric, a dtype, ...) is typed with one
of the aliases below, so a type checker catches `mode="exct"`; at run time a bad value raises
`ValueError` naming the argument and listing the allowed values. The tables map each name to
its proto enum value and back; a test checks they cover every value of the proto enums.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar, get_args

from .v1 import common_pb2, kinship_pb2, merge_pb2, recommend_pb2

Mode = Literal["auto", "exact", "fingerprint"]
"""How kinship is computed: `exact` reads the weights, `fingerprint` answers from cached
fingerprints only, `auto` uses fingerprints where they exist and reads weights otherwise."""
ModeUsed = Literal["exact", "fingerprint", "unspecified"]
"""How an answer was computed (`unspecified`: every value came from known_kinship)."""
Metric = Literal["pcc", "cosine", "euclidean"]
"""Kinship metric: Pearson correlation, cosine similarity or Euclidean distance of task vectors."""
KinshipShapeMismatch = Literal["skip", "leading_slice"]
"""What Kinship does with a tensor whose shape differs between models: leave it out, or compare
the common leading slice."""
MergeShapeMismatch = Literal["error", "leading_slice"]
"""What a merge does with a tensor whose shape differs: fail, or merge the common leading slice."""
Dtype = Literal["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"]
"""Output dtype of a merge (short names accepted). At run time upper case and a `torch.` prefix
(`str(torch.bfloat16)`) are accepted too."""
Aggregation = Literal["mean", "min", "max"]
"""How ShouldStop reduces the top-k's pairwise kinship to one number."""
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
"""A merge job's state (run time accepts any letter case)."""
RecommendationKind = Literal["greedy", "exploration"]
"""Why RankCandidates recommends a pair."""
StopReason = Literal["kinship_saturated", "topk_unchanged", "gain_plateau", "no_expected_gain"]
"""Why ShouldStop says stop."""
GreedyOrder = Literal["mean_score", "expected_score", "task_ceiling"]
"""How RankCandidates orders (and with `max_greedy` / `greedy_fraction` selects) the greedy pairs."""
ExplorationRule = Literal["latest_generation", "outside_lineage", "complementary", "none"]
"""How RankCandidates picks the best model's exploration partner (`none`: plain greedy)."""
SlerpFactor = Literal["none", "even", "score_weighted"]
"""Which SLERP factor RankCandidates suggests per pair (`none`: no suggestion)."""
SkipReason = Literal["missing", "shape_mismatch", "not_floating"]
"""Why Kinship left a tensor out."""

MODES: tuple[Mode, ...] = get_args(Mode)
METRICS: tuple[Metric, ...] = get_args(Metric)
KINSHIP_SHAPE_MISMATCHES: tuple[KinshipShapeMismatch, ...] = get_args(KinshipShapeMismatch)
MERGE_SHAPE_MISMATCHES: tuple[MergeShapeMismatch, ...] = get_args(MergeShapeMismatch)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
GREEDY_ORDERS: tuple[GreedyOrder, ...] = get_args(GreedyOrder)
EXPLORATION_RULES: tuple[ExplorationRule, ...] = get_args(ExplorationRule)
SLERP_FACTORS: tuple[SlerpFactor, ...] = get_args(SlerpFactor)
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
FINAL_JOB_STATES: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled"})

MODE_VALUES: Mapping[Mode, common_pb2.KinshipMode] = {
    "auto": common_pb2.KINSHIP_MODE_AUTO,
    "exact": common_pb2.KINSHIP_MODE_EXACT,
    "fingerprint": common_pb2.KINSHIP_MODE_FINGERPRINT,
}
MODE_USED_NAMES: Mapping[int, ModeUsed] = {
    common_pb2.KINSHIP_MODE_UNSPECIFIED: "unspecified",
    common_pb2.KINSHIP_MODE_EXACT: "exact",
    common_pb2.KINSHIP_MODE_FINGERPRINT: "fingerprint",
}
METRIC_VALUES: Mapping[Metric, common_pb2.Metric] = {
    "pcc": common_pb2.METRIC_PCC,
    "cosine": common_pb2.METRIC_COSINE,
    "euclidean": common_pb2.METRIC_EUCLIDEAN,
}
METRIC_NAMES: Mapping[int, Metric] = {value: name for name, value in METRIC_VALUES.items()}
SHAPE_MISMATCH_VALUES: Mapping[KinshipShapeMismatch | MergeShapeMismatch, common_pb2.ShapeMismatchPolicy] = {
    "skip": common_pb2.SHAPE_MISMATCH_POLICY_SKIP,
    "leading_slice": common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
    "error": common_pb2.SHAPE_MISMATCH_POLICY_ERROR,
}
DTYPE_VALUES: Mapping[Dtype, merge_pb2.Dtype] = {
    "float32": merge_pb2.DTYPE_FLOAT32,
    "fp32": merge_pb2.DTYPE_FLOAT32,
    "float16": merge_pb2.DTYPE_FLOAT16,
    "fp16": merge_pb2.DTYPE_FLOAT16,
    "bfloat16": merge_pb2.DTYPE_BFLOAT16,
    "bf16": merge_pb2.DTYPE_BFLOAT16,
}
AGGREGATION_VALUES: Mapping[Aggregation, recommend_pb2.Aggregation] = {
    "mean": recommend_pb2.AGGREGATION_MEAN,
    "min": recommend_pb2.AGGREGATION_MIN,
    "max": recommend_pb2.AGGREGATION_MAX,
}
GREEDY_ORDER_VALUES: Mapping[GreedyOrder, recommend_pb2.GreedyOrder] = {
    "mean_score": recommend_pb2.GREEDY_ORDER_MEAN_SCORE,
    "expected_score": recommend_pb2.GREEDY_ORDER_EXPECTED_SCORE,
    "task_ceiling": recommend_pb2.GREEDY_ORDER_TASK_CEILING,
}
EXPLORATION_RULE_VALUES: Mapping[ExplorationRule, recommend_pb2.ExplorationRule] = {
    "latest_generation": recommend_pb2.EXPLORATION_RULE_LATEST_GENERATION,
    "outside_lineage": recommend_pb2.EXPLORATION_RULE_OUTSIDE_LINEAGE,
    "complementary": recommend_pb2.EXPLORATION_RULE_COMPLEMENTARY,
    "none": recommend_pb2.EXPLORATION_RULE_NONE,
}
SLERP_FACTOR_VALUES: Mapping[SlerpFactor, recommend_pb2.SlerpFactor] = {
    "none": recommend_pb2.SLERP_FACTOR_UNSPECIFIED,
    "even": recommend_pb2.SLERP_FACTOR_EVEN,
    "score_weighted": recommend_pb2.SLERP_FACTOR_SCORE_WEIGHTED,
}
JOB_STATE_VALUES: Mapping[JobState, merge_pb2.MergeJobState] = {
    "queued": merge_pb2.MERGE_JOB_STATE_QUEUED,
    "running": merge_pb2.MERGE_JOB_STATE_RUNNING,
    "succeeded": merge_pb2.MERGE_JOB_STATE_SUCCEEDED,
    "failed": merge_pb2.MERGE_JOB_STATE_FAILED,
    "cancelled": merge_pb2.MERGE_JOB_STATE_CANCELLED,
}
JOB_STATE_NAMES: Mapping[int, JobState] = {value: name for name, value in JOB_STATE_VALUES.items()}
RECOMMENDATION_KIND_NAMES: Mapping[int, RecommendationKind] = {
    recommend_pb2.RECOMMENDATION_KIND_GREEDY: "greedy",
    recommend_pb2.RECOMMENDATION_KIND_EXPLORATION: "exploration",
}
STOP_REASON_NAMES: Mapping[int, StopReason] = {
    recommend_pb2.STOP_REASON_KINSHIP_SATURATED: "kinship_saturated",
    recommend_pb2.STOP_REASON_TOPK_UNCHANGED: "topk_unchanged",
    recommend_pb2.STOP_REASON_GAIN_PLATEAU: "gain_plateau",
    recommend_pb2.STOP_REASON_NO_EXPECTED_GAIN: "no_expected_gain",
}
SKIP_REASON_NAMES: Mapping[int, SkipReason] = {
    kinship_pb2.SKIP_REASON_MISSING: "missing",
    kinship_pb2.SKIP_REASON_SHAPE_MISMATCH: "shape_mismatch",
    kinship_pb2.SKIP_REASON_NOT_FLOATING: "not_floating",
}

Name = TypeVar("Name", bound=str)


def choice(argument: str, value: object, allowed: tuple[Name, ...]) -> Name:
    """`value` when it is one of `allowed`; else ValueError naming `argument` and listing the allowed values.

    Raises:
        ValueError: `value` is not one of `allowed` (the message lists them).
    """
    for option in allowed:
        if value == option:
            return option
    raise ValueError(f"{argument}={value!r} is not allowed; use one of: {', '.join(repr(o) for o in allowed)}")


def mode_value(mode: object, argument: str = "mode") -> common_pb2.KinshipMode:
    """The KinshipMode of `mode` (auto, exact or fingerprint). Raises ValueError for any other value."""
    return MODE_VALUES[choice(argument, mode, MODES)]


def metric_value(metric: object, argument: str = "metric") -> common_pb2.Metric:
    """The Metric of `metric` (pcc, cosine or euclidean). Raises ValueError for any other value."""
    return METRIC_VALUES[choice(argument, metric, METRICS)]


def kinship_shape_mismatch_value(policy: object, argument: str = "shape_mismatch") -> common_pb2.ShapeMismatchPolicy:
    """The ShapeMismatchPolicy of a Kinship `policy` (skip or leading_slice). Raises ValueError for any other value."""
    return SHAPE_MISMATCH_VALUES[choice(argument, policy, KINSHIP_SHAPE_MISMATCHES)]


def merge_shape_mismatch_value(policy: object, argument: str = "shape_mismatch") -> common_pb2.ShapeMismatchPolicy:
    """The ShapeMismatchPolicy of a merge `policy` (error or leading_slice). Raises ValueError for any other value."""
    return SHAPE_MISMATCH_VALUES[choice(argument, policy, MERGE_SHAPE_MISMATCHES)]


def aggregation_value(aggregation: object, argument: str = "aggregation") -> recommend_pb2.Aggregation:
    """The Aggregation of `aggregation` (mean, min or max). Raises ValueError for any other value."""
    return AGGREGATION_VALUES[choice(argument, aggregation, AGGREGATIONS)]


def greedy_order_value(order: object, argument: str = "greedy_order") -> recommend_pb2.GreedyOrder:
    """The GreedyOrder of `order` (mean_score, expected_score or task_ceiling). Raises ValueError for any other value."""
    return GREEDY_ORDER_VALUES[choice(argument, order, GREEDY_ORDERS)]


def exploration_rule_value(rule: object, argument: str = "exploration") -> recommend_pb2.ExplorationRule:
    """The ExplorationRule of `rule` (latest_generation, outside_lineage, complementary or none). Raises ValueError otherwise."""
    return EXPLORATION_RULE_VALUES[choice(argument, rule, EXPLORATION_RULES)]


def slerp_factor_value(factor: object, argument: str = "slerp_factor") -> recommend_pb2.SlerpFactor:
    """The SlerpFactor of `factor` (none, even or score_weighted). Raises ValueError for any other value."""
    return SLERP_FACTOR_VALUES[choice(argument, factor, SLERP_FACTORS)]


def dtype_value(dtype: object, argument: str = "dtype") -> merge_pb2.Dtype:
    """The Dtype of `dtype`; None (or "") -> unspecified (model A's dtype).

    Accepts the names of `Dtype` in any letter case, with or without a `torch.` prefix.

    Raises:
        ValueError: any other value (the message lists the allowed names).
    """
    if dtype is None or dtype == "":
        return merge_pb2.DTYPE_UNSPECIFIED
    key = dtype.lower().removeprefix("torch.") if isinstance(dtype, str) else dtype
    for name in DTYPES:
        if key == name:
            return DTYPE_VALUES[name]
    raise ValueError(f"{argument}={dtype!r} is not allowed; use one of: {', '.join(repr(d) for d in DTYPES)} (or None: model A's)")


def job_state_value(state: object, argument: str = "state") -> merge_pb2.MergeJobState:
    """The MergeJobState of `state` (any letter case); None -> unspecified (every state).

    Raises:
        ValueError: any other value (the message lists the states).
    """
    if state is None:
        return merge_pb2.MERGE_JOB_STATE_UNSPECIFIED
    key = state.lower() if isinstance(state, str) else state
    for name in JOB_STATES:
        if key == name:
            return JOB_STATE_VALUES[name]
    raise ValueError(f"{argument}={state!r} is not allowed; use one of: {', '.join(repr(s) for s in JOB_STATES)} (or None: all)")


Received = TypeVar("Received", bound=str)


def received(table: Mapping[int, Received], value: int, what: str) -> Received:
    """The name of enum `value` received from the server.

    Raises:
        ValueError: the server sent a value this client does not know (it is newer: upgrade kinship_client).
    """
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"the server sent {what} {value}, which this client does not know; upgrade kinship_client") from None
