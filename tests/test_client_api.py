"""The client's typed API: every closed set of strings is a Literal type, a bad value a ValueError listing the good ones.

The ValueError tests need no server (the client refuses before calling); one real-server call per
Literal type shows the good values still work. The CLI part runs `kinship` in a subprocess with
bytes in argv that are not UTF-8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import grpc
import pytest

import kinship_client
from kinship_client import KinshipClient, KinshipResult, KinshipRpcError, Member, Values
from kinship_client import choices as c
from kinship_client.v1 import common_pb2, kinship_pb2, merge_pb2, recommend_pb2


@pytest.fixture
def offline() -> Iterator[KinshipClient]:
    """A client of a port nobody listens on: calls would fail, so a ValueError proves the client refused first."""
    with KinshipClient("127.0.0.1:1", timeout=5) as client:
        yield client


def _members(paths: dict[str, Path] | None = None) -> list[Member]:
    if paths is None:
        return [Member("a", 1.0, "/a"), Member("b", 2.0, "/b"), Member("c", 3.0, "/c")]
    return [Member(f"m{i}", 60.0 + i, str(paths[f"m{i}"]), 0) for i in range(3)]


BAD_ARGUMENTS: list[tuple[str, Callable[[KinshipClient], Any], str, tuple[str, ...]]] = [
    ("kinship mode", lambda k: k.kinship("/b", ["/x", "/y"], mode="exct"), "mode='exct'", c.MODES),
    ("kinship policy", lambda k: k.kinship("/b", ["/x", "/y"], shape_mismatch="error"), "shape_mismatch='error'", c.KINSHIP_SHAPE_MISMATCHES),
    ("rank metric", lambda k: k.rank_candidates(_members(), top_k=2, metric="pearson"), "metric='pearson'", c.METRICS),
    ("rank mode", lambda k: k.rank_candidates(_members(), top_k=2, mode="EXACT"), "mode='EXACT'", c.MODES),
    ("stop aggregation", lambda k: k.should_stop(_members(), top_k=2, aggregation="median"), "aggregation='median'", c.AGGREGATIONS),
    ("stop metric", lambda k: k.should_stop(_members(), top_k=2, metric="l2"), "metric='l2'", c.METRICS),
    ("stop mode", lambda k: k.should_stop(_members(), top_k=2, mode=3), "mode=3", c.MODES),
    ("merge dtype", lambda k: k.start_merge("/a", "/b", output_path="o", dtype="int8"), "dtype='int8'", c.DTYPES),
    ("merge policy", lambda k: k.start_merge("/a", "/b", output_path="o", shape_mismatch="skip"), "shape_mismatch='skip'", c.MERGE_SHAPE_MISMATCHES),
    ("merge op policy", lambda k: k.merge("/a", "/b", output_path="o", shape_mismatch="slice"), "shape_mismatch='slice'", c.MERGE_SHAPE_MISMATCHES),
    ("job state", lambda k: k.list_merge_jobs(state="done"), "state='done'", c.JOB_STATES),
]


@pytest.mark.parametrize("call,shown,allowed", [case[1:] for case in BAD_ARGUMENTS], ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_argument_raises_value_error_listing_the_allowed_values(
    offline: KinshipClient, call: Callable[[KinshipClient], Any], shown: str, allowed: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError) as info:
        call(offline)
    message = str(info.value)
    assert shown in message, message
    for value in allowed:
        assert repr(value) in message, (value, message)


def test_result_matrix_metric_is_checked() -> None:
    result = KinshipResult(
        models=["a", "b"], pairs=[], mean=Values(0.0, 0.0, 0.0), mode="exact", tensors_compared=0, elements_compared=0,
        skipped=[], sliced=[], layers=[], bytes_read=0, device="cpu", seconds=0.0, raw=kinship_pb2.KinshipResponse(),
    )
    with pytest.raises(ValueError, match=r"metric='spearman'.*'pcc', 'cosine', 'euclidean'"):
        result.matrix("spearman")  # a value outside Metric, as an untyped caller could send


def test_lenient_spellings_still_work() -> None:
    """Dtypes accept upper case and a `torch.` prefix, states any case, as before."""
    assert c.dtype_value("torch.bfloat16") == c.dtype_value("BF16") == merge_pb2.DTYPE_BFLOAT16
    assert c.dtype_value(None) == c.dtype_value("") == merge_pb2.DTYPE_UNSPECIFIED
    assert c.job_state_value("RUNNING") == merge_pb2.MERGE_JOB_STATE_RUNNING
    assert c.job_state_value(None) == merge_pb2.MERGE_JOB_STATE_UNSPECIFIED


def test_path_that_is_not_utf8_names_the_argument(offline: KinshipClient) -> None:
    bad = b"/models/\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match=r"^models\[1\] .* is not valid UTF-8"):
        offline.kinship("/base", ["/a", bad])
    with pytest.raises(ValueError, match=r"^members\[2\]\.checkpoint .* is not valid UTF-8"):
        offline.rank_candidates([*_members()[:2], Member("c", 3.0, bad)], top_k=2, base="/base")


def test_tables_cover_every_proto_enum_value() -> None:
    """Each Literal alias matches its proto enum: a new enum value must get a name here."""

    def values(enum: Any) -> set[int]:
        return {v for v in enum.values() if v != 0}

    assert set(c.MODE_VALUES.values()) == values(common_pb2.KinshipMode)
    assert set(c.MODE_USED_NAMES) == values(common_pb2.KinshipMode) - {common_pb2.KINSHIP_MODE_AUTO} | {0}
    assert set(c.METRIC_VALUES.values()) == set(c.METRIC_NAMES) == values(common_pb2.Metric)
    assert set(c.SHAPE_MISMATCH_VALUES.values()) == values(common_pb2.ShapeMismatchPolicy)
    assert set(c.DTYPE_VALUES.values()) == values(merge_pb2.Dtype)
    assert set(c.AGGREGATION_VALUES.values()) == values(recommend_pb2.Aggregation)
    assert set(c.GREEDY_ORDER_VALUES.values()) == values(recommend_pb2.GreedyOrder)
    assert set(c.EXPLORATION_RULE_VALUES.values()) == values(recommend_pb2.ExplorationRule)
    assert set(c.SLERP_FACTOR_VALUES.values()) == values(recommend_pb2.SlerpFactor) | {0}
    assert set(c.JOB_STATE_VALUES.values()) == set(c.JOB_STATE_NAMES) == values(merge_pb2.MergeJobState)
    assert set(c.RECOMMENDATION_KIND_NAMES) == values(recommend_pb2.RecommendationKind)
    assert set(c.STOP_REASON_NAMES) == values(recommend_pb2.StopReason)
    assert set(c.SKIP_REASON_NAMES) == values(kinship_pb2.SkipReason)
    for table, alias in [
        (c.MODE_VALUES, c.Mode), (c.METRIC_VALUES, c.Metric), (c.DTYPE_VALUES, c.Dtype),
        (c.AGGREGATION_VALUES, c.Aggregation), (c.JOB_STATE_VALUES, c.JobState),
        (c.GREEDY_ORDER_VALUES, c.GreedyOrder), (c.EXPLORATION_RULE_VALUES, c.ExplorationRule),
        (c.SLERP_FACTOR_VALUES, c.SlerpFactor),
    ]:
        assert set(table) == set(get_args(alias))
    assert set(get_args(c.KinshipShapeMismatch)) | set(get_args(c.MergeShapeMismatch)) == set(c.SHAPE_MISMATCH_VALUES)
    assert set(c.RECOMMENDATION_KIND_NAMES.values()) == set(get_args(c.RecommendationKind))
    assert set(c.STOP_REASON_NAMES.values()) == set(get_args(c.StopReason))
    assert set(c.SKIP_REASON_NAMES.values()) == set(get_args(c.SkipReason))
    assert set(c.MODE_USED_NAMES.values()) == set(get_args(c.ModeUsed))


def test_aliases_are_exported() -> None:
    for name in ("Mode", "ModeUsed", "Metric", "Dtype", "KinshipShapeMismatch", "MergeShapeMismatch", "Aggregation",
                 "JobState", "RecommendationKind", "StopReason", "SkipReason", "CheckpointLike", "Registration"):
        assert name in kinship_client.__all__ and hasattr(kinship_client, name), name


# -- the good values, against a real server -------------------------------------------------------


def test_modes_and_kinship_policies_work(client: KinshipClient, family: dict[str, Any]) -> None:
    paths = family["paths"]
    result = client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="exact", shape_mismatch="leading_slice")
    assert result.mode == "exact" and len(result.pairs) == 1
    assert set(result.matrix("cosine")[0]) <= {1.0, result.pairs[0].values.cosine}
    assert client.kinship(str(paths["base"]), [str(paths["m0"]), str(paths["m1"])], mode="auto").mode in get_args(c.ModeUsed)


def test_metrics_modes_and_aggregations_work(client: KinshipClient, family: dict[str, Any]) -> None:
    paths, members = family["paths"], _members(family["paths"])
    ranking = client.rank_candidates(members, top_k=3, base=str(paths["base"]), metric="cosine", mode="exact")
    assert ranking.matrix.metric == "cosine" and ranking.mode == "exact"
    assert {r.kind for r in ranking.recommendations} <= set(get_args(c.RecommendationKind)) and ranking.greedy
    decision = client.should_stop(members, top_k=3, base=str(paths["base"]), aggregation="min", metric="pcc", kinship_threshold=-1.0)
    assert decision.stop and decision.reasons == ["kinship_saturated"]


def test_fingerprint_mode_without_fingerprints_names_the_reason(client: KinshipClient, family: dict[str, Any]) -> None:
    """As docs/population.md says: FINGERPRINT answers FAILED_PRECONDITION FINGERPRINT_MISSING until the members are registered."""
    paths = family["paths"]
    with pytest.raises(KinshipRpcError) as info:
        client.rank_candidates(_members(paths), top_k=3, base=str(paths["base"]), mode="fingerprint")
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FINGERPRINT_MISSING")


def test_dtypes_merge_policies_and_job_states_work(client: KinshipClient, family: dict[str, Any]) -> None:
    paths = family["paths"]
    op = client.merge(str(paths["m0"]), str(paths["m1"]), output_path="typed", dtype="bf16", shape_mismatch="leading_slice")
    info = op.wait(timeout=120)
    assert info.state == "succeeded" and info.done
    jobs, _ = client.list_merge_jobs(state="succeeded")
    assert info.job_id in {j.job_id for j in jobs}
    assert client.list_merge_jobs(state="failed")[0] == []


# -- the CLI with bytes that are not UTF-8 ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv,argument",
    [
        ([b"kinship", b"--base", b"\xff", b"/a", b"/b"], "--base"),
        ([b"kinship", b"--base", b"/b", b"/a", b"/m\xfe"], "models"),
        ([b"register", b"--base", b"/b", b"/c\xff"], "checkpoint"),
        ([b"merge", b"/a\xff", b"/b", b"--out", b"o"], "MODEL"),
        ([b"merge", b"/a", b"/b", b"--out", b"o\xff"], "--out"),
        ([b"jobs", b"get", b"\xffjob"], "job_id"),
        ([b"--token", b"t\xff", b"jobs", b"list"], "--token"),
    ],
)
def test_cli_argument_not_utf8_is_a_usage_error(argv: list[bytes], argument: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "kinship_client.cli", "--target", "127.0.0.1:1", *argv], capture_output=True, timeout=120
    )
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kinship: argument {argument}: ") and "not valid UTF-8" in lines[0], err
    assert run.stdout == b""


def test_cli_population_checkpoint_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    population = tmp_path / "population.json"
    population.write_text(json.dumps({"members": [{"name": "a", "score": 1, "checkpoint": "/a\udcff"}, {"name": "b", "score": 2}]}))
    run = subprocess.run(
        [sys.executable, "-m", "kinship_client.cli", "--target", "127.0.0.1:1", "rank", str(population), "--top-k", "2"],
        capture_output=True, timeout=120,
    )
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and "members[0].checkpoint" in err, err
