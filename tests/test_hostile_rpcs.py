"""Hostile input for every RPC but Kinship (tests/test_hostile_inputs.py covers Kinship and hostile headers).

Hypothesis builds arbitrary requests: huge lists, NaN and infinite scores, t values and
thresholds, unicode and NUL bytes in names and paths, traversal tricks (`..`, absolute paths,
symlinks leaving the allowed roots), bogus parents, absurd shard sizes, bogus mergekit YAML
including alias bombs, random job ids and page tokens. Every answer must carry a status code from
the RPC's documented list (docs/reliability.md), arrive within the deadline with a message and no
stack trace, and the server must keep answering. Nothing is written outside the output root.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinship_client.v1 import common_pb2, merge_pb2, recommend_pb2, service_pb2_grpc
from kinship_service.checkpoints.synthetic import make_base, make_family, save_checkpoint

from .conftest import SMALL
from .test_hostile_inputs import TRICKY_PATHS

pytestmark = pytest.mark.both_layouts  # each server test also runs through the front (conftest)

C = grpc.StatusCode
# The documented status codes per RPC (docs/reliability.md keeps the same table).
DOCUMENTED: dict[str, set[grpc.StatusCode]] = {
    "RankCandidates": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "ShouldStop": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "StartMerge": {
        C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED,
    },
    "GetMergeJob": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND},
    "CancelMergeJob": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION},
    "WatchMergeJob": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND},
    "ListMergeJobs": {C.OK, C.INVALID_ARGUMENT},
}
DEADLINE = 20.0
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 0.5, 1e308, -1e308, 5e-324, 2.0, -1.0]),
)
NAMES = st.one_of(
    st.sampled_from(["a", "b", "c", "m0", "m1", "", " ", "a\x00b", "\u202eevil", "../x", "é" * 50, "a" * 2000]),
    st.text(max_size=40),
)


def call(stub: service_pb2_grpc.KinshipServiceStub, method: str, request: object) -> grpc.StatusCode:
    """Call an RPC (draining a stream); assert a documented code, a message and no stack trace."""
    try:
        response = getattr(stub, method)(request, timeout=DEADLINE)
        if method == "WatchMergeJob":
            for _ in response:
                pass
        return C.OK
    except grpc.RpcError as error:
        code = error.code()
        details = error.details() or ""
        assert "Traceback" not in details, details
        assert code in DOCUMENTED[method], (method, code, details, request)
        assert details.strip(), (method, code)
        return code


@pytest.fixture
def population(model_root: Path, tmp_path: Path) -> dict[str, Path]:
    base = make_base(SMALL, seed=50)
    paths = {"base": save_checkpoint(base, model_root / "base", config=SMALL.config(torch.float32))}
    for i, model in enumerate(make_family(base, 3, rho=0.5, seed=51)):
        paths[f"m{i}"] = save_checkpoint(model, model_root / f"m{i}", config=SMALL.config(torch.float32))
    outside = tmp_path / "outside"
    save_checkpoint(base, outside, config=SMALL.config(torch.float32))
    (model_root / "escape").symlink_to(outside)
    return paths


def ref_strategy(root: Path) -> st.SearchStrategy[common_pb2.CheckpointRef]:
    paths = st.one_of(
        st.sampled_from([str(root / n) for n in ("base", "m0", "m1", "m2", "escape", "nope")]),
        st.sampled_from(TRICKY_PATHS),
        st.builds(lambda a, b: str(root / a / b), st.text(max_size=20), st.sampled_from(["..", "../..", ".", "x"])),
    )
    by_path = paths.map(lambda p: common_pb2.CheckpointRef(path=p))
    by_hub = st.builds(
        lambda repo, rev: common_pb2.CheckpointRef(hub=common_pb2.HubCheckpoint(repo_id=repo, revision=rev)),
        st.one_of(st.text(max_size=60), st.sampled_from(["a/b", "../x", "/abs", "org/" + "n" * 300])),
        st.text(max_size=20),
    )
    return st.one_of(by_path, by_hub, st.just(common_pb2.CheckpointRef()))


def member_strategy(root: Path) -> st.SearchStrategy[recommend_pb2.PopulationMember]:
    def build(name, ref, score, generation, parents):
        member = recommend_pb2.PopulationMember(name=name, parents=parents)
        if ref is not None:
            member.checkpoint.CopyFrom(ref)
        if score is not None:
            member.score = score
        if generation is not None:
            member.generation = generation
        return member

    return st.builds(
        build,
        NAMES,
        st.one_of(st.none(), ref_strategy(root)),
        st.one_of(st.none(), FLOATS),
        st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
        st.lists(NAMES, max_size=4),
    )


def pair_strategy() -> st.SearchStrategy[recommend_pb2.MemberPair]:
    return st.builds(lambda a, b: recommend_pb2.MemberPair(first=a, second=b), NAMES, NAMES)


def test_rank_candidates_and_should_stop_with_arbitrary_populations(server, population, model_root: Path) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        base=st.one_of(st.none(), ref_strategy(model_root)),
        members=st.lists(member_strategy(model_root), max_size=12),
        top_k=st.one_of(st.integers(min_value=-3, max_value=14), st.sampled_from([2**31 - 1, -(2**31)])),
        metric=st.integers(min_value=-2, max_value=6),
        mode=st.integers(min_value=-2, max_value=6),
        aggregation=st.integers(min_value=-2, max_value=6),
        known=st.lists(st.builds(lambda p, v: recommend_pb2.KnownKinship(pair=p, value=v), pair_strategy(), FLOATS), max_size=8),
        merged=st.lists(pair_strategy(), max_size=4),
        previous=st.lists(NAMES, max_size=4),
        threshold=st.one_of(st.none(), FLOATS),
        gain_window=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        gain_threshold=st.one_of(st.none(), FLOATS),
    )
    def check(base, members, top_k, metric, mode, aggregation, known, merged, previous, threshold, gain_window, gain_threshold):
        rank = recommend_pb2.RankCandidatesRequest(
            members=members, merged_pairs=merged, top_k=top_k, metric=metric, mode=mode, known_kinship=known
        )
        stop = recommend_pb2.ShouldStopRequest(
            members=members, top_k=top_k, previous_top_k=previous, aggregation=aggregation, metric=metric,
            gain_window=gain_window, mode=mode, known_kinship=known,
        )
        if base is not None:
            rank.base.CopyFrom(base)
            stop.base.CopyFrom(base)
        if threshold is not None:
            stop.kinship_threshold = threshold
        if gain_threshold is not None:
            stop.gain_threshold = gain_threshold
        seen.add(call(stub, "RankCandidates", rank))
        seen.add(call(stub, "ShouldStop", stop))

    try:
        check()
        assert C.INVALID_ARGUMENT in seen
        # alive and answering with real work afterwards
        members = [
            recommend_pb2.PopulationMember(name=f"m{i}", score=0.5 + i / 10, checkpoint=common_pb2.CheckpointRef(path=str(population[f"m{i}"])))
            for i in range(3)
        ]
        answer = stub.ShouldStop(
            recommend_pb2.ShouldStopRequest(base=common_pb2.CheckpointRef(path=str(population["base"])), members=members, top_k=3),
            timeout=60,
        )
        assert len(answer.top_k) == 3
    finally:
        channel.close()


def test_huge_populations_are_refused_quickly_not_enumerated(server) -> None:
    """200,000 members with top_k = 200,000 would be 2e10 pairs: refused before any pair is listed."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 2**20)])
    stub = service_pb2_grpc.KinshipServiceStub(channel)
    try:
        n = 200_000
        members = [recommend_pb2.PopulationMember(name=f"m{i}", score=float(i)) for i in range(n)]
        for method, request in (
            ("RankCandidates", recommend_pb2.RankCandidatesRequest(members=members, top_k=n)),
            ("ShouldStop", recommend_pb2.ShouldStopRequest(members=members, top_k=n)),
        ):
            assert call(stub, method, request) == C.INVALID_ARGUMENT
        # a list too long for the message limit (16 MiB) is refused by gRPC itself
        names = ["x" * 100 + str(i) for i in range(200_000)]
        big = recommend_pb2.ShouldStopRequest(members=[recommend_pb2.PopulationMember(name=s, score=1.0) for s in names], top_k=2)
        assert call(stub, "ShouldStop", big) == C.RESOURCE_EXHAUSTED
        assert call(stub, "ListMergeJobs", merge_pb2.ListMergeJobsRequest()) == C.OK
    finally:
        channel.close()


# -- merges -------------------------------------------------------------------------------------
def yaml_bomb(levels: int = 9, target: str = "base_model") -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    last = chr(ord("a") + levels - 1)
    body = {
        "base_model": f"merge_method: slerp\nbase_model: *{last}\nmodels: [x, y]\nparameters: {{t: 0.5}}\n",
        "merge_method": f"merge_method: *{last}\n",
        "t": f"merge_method: slerp\nbase_model: x\nmodels: [x, y]\nparameters: {{t: *{last}}}\n",
        "filter": f"merge_method: slerp\nbase_model: x\nmodels: [x, y]\nparameters: {{t: [{{filter: *{last}, value: 0.5}}]}}\n",
    }[target]
    return "\n".join(lines) + "\n" + body


BOGUS_YAML = [
    "",
    "- just\n- a list\n",
    "merge_method: slerp\n",
    "merge_method: ties\nbase_model: a\nmodels: [a, b]\n",
    "merge_method: slerp\nbase_model: m0\nmodels: [m0, m1]\nparameters: {t: .nan}\n",
    "merge_method: slerp\nbase_model: m0\nmodels: [m0, m1]\nparameters: {t: .inf}\n",
    "merge_method: slerp\nbase_model: m0\nmodels: [m0, m1]\nparameters: {t: [0.1, -3, 7]}\n",
    "merge_method: slerp\nbase_model: m0\nmodels: [m0, m1]\nparameters: {t: [{filter: \"\\0\", value: 0.5}]}\n",
    "merge_method: slerp\nbase_model: ../../../etc\nmodels: [../../../etc, /etc/passwd]\nparameters: {t: 0.5}\n",
    "merge_method: slerp\nbase_model: \"m0\\0x\"\nmodels: [\"m0\\0x\", m1]\nparameters: {t: 0.5}\n",
    "merge_method: slerp\nbase_model: m0\nslices: [{sources: [{model: m0, layer_range: [0, 99999999999]}, {model: m1, layer_range: [0, 99999999999]}]}]\nparameters: {t: 0.5}\n",
    "!!python/object/apply:os.system ['echo pwned']\n",
    "a: &a [*a]\n",
    "[" * 5000 + "]" * 5000,
    "{" * 200,
    "merge_method: slerp\n" * 1000,
    yaml_bomb(target="base_model"),
    yaml_bomb(target="merge_method"),
    yaml_bomb(target="t"),
    yaml_bomb(target="filter"),
]
OUTPUT_PATHS = [
    "", ".", "..", "../escape", "/abs/out", "a/../../b", "a\x00b", "\u202eout", "~/out", "a" * 5000, "x/" * 300,
    "ok/out", "ok/out", ".kinship-tmp-x", "con", "a\\..\\b", "out/",
]


def factor_strategy() -> st.SearchStrategy[merge_pb2.InterpolationFactor]:
    value = st.one_of(
        FLOATS.map(lambda v: merge_pb2.FactorValue(constant=v)),
        st.lists(FLOATS, max_size=40).map(lambda a: merge_pb2.FactorValue(gradient=merge_pb2.LayerGradient(anchors=a))),
        st.just(merge_pb2.FactorValue()),
    )
    entry = st.builds(lambda f, v: merge_pb2.FilteredFactor(filter=f, value=v), NAMES, value)
    return st.lists(entry, max_size=6).map(lambda e: merge_pb2.InterpolationFactor(entries=e))


def test_start_merge_with_arbitrary_requests(server, population, model_root: Path, tmp_path: Path) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)
    output_root = Path(server.settings.output_root)
    before_outside = sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(output_root)))
    job_ids: list[str] = []

    valid_a = common_pb2.CheckpointRef(path=str(population["m0"]))
    valid_b = common_pb2.CheckpointRef(path=str(population["m1"]))
    valid_t = merge_pb2.InterpolationFactor(entries=[merge_pb2.FilteredFactor(value=merge_pb2.FactorValue(constant=0.5))])
    counter = iter(range(10**6))

    def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
        """None (the field keeps a valid value) or a hostile one: requests hostile in one field reach deep paths."""
        return st.one_of(st.none(), st.none(), st.none(), strategy)  # mostly valid, hostile in a field or two

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        request_id=maybe(st.text(max_size=300)),
        model_a=maybe(st.one_of(st.none(), ref_strategy(model_root))),
        model_b=maybe(st.one_of(st.none(), ref_strategy(model_root))),
        t=maybe(st.one_of(st.none(), factor_strategy())),
        yaml_text=maybe(st.one_of(st.sampled_from(BOGUS_YAML), st.text(max_size=200))),
        output_path=maybe(st.one_of(st.sampled_from(OUTPUT_PATHS), st.text(max_size=80))),
        dtype=maybe(st.integers(min_value=-2, max_value=8)),
        shard=maybe(st.one_of(st.sampled_from([1, -1, 2**63 - 1, -(2**63), 4096]), st.integers(min_value=-(2**63), max_value=2**63 - 1))),
        policy=maybe(st.integers(min_value=-2, max_value=6)),
        overwrite=st.booleans(),
    )
    def check(request_id, model_a, model_b, t, yaml_text, output_path, dtype, shard, policy, overwrite):
        request = merge_pb2.StartMergeRequest(
            request_id=request_id or "",
            mergekit_yaml=yaml_text or "",
            output_path=output_path if output_path is not None else f"fine/{next(counter)}",
            dtype=dtype or 0,
            max_shard_bytes=shard or 0,
            shape_mismatch_policy=policy or 0,
            overwrite=overwrite,
        )
        for name, value, default in (("model_a", model_a, valid_a), ("model_b", model_b, valid_b), ("t", t, valid_t)):
            if value is None and not yaml_text:
                value = default
            if value:  # a hostile "unset" stays unset
                getattr(request, name).CopyFrom(value)
        try:
            job = stub.StartMerge(request, timeout=DEADLINE).job
            job_ids.append(job.job_id)
            assert Path(job.output_path).resolve().is_relative_to(output_root.resolve()), job.output_path
        except grpc.RpcError as error:
            assert error.code() in DOCUMENTED["StartMerge"], (error.code(), error.details(), request)
            assert "Traceback" not in (error.details() or "")

    try:
        check()
        # every accepted job reaches a final state with a reason, and its output stays under the root
        for job_id in job_ids:
            states = [j.job.state for j in stub.WatchMergeJob(merge_pb2.WatchMergeJobRequest(job_id=job_id), timeout=120)]
            final = stub.GetMergeJob(merge_pb2.GetMergeJobRequest(job_id=job_id), timeout=DEADLINE).job
            assert states and states[-1] == final.state
            assert final.state in (merge_pb2.MERGE_JOB_STATE_SUCCEEDED, merge_pb2.MERGE_JOB_STATE_FAILED), final
            if final.state == merge_pb2.MERGE_JOB_STATE_FAILED:
                assert final.error.message and final.error.reason and "Traceback" not in final.error.message
        after_outside = sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(output_root)))
        assert after_outside == before_outside, "nothing was written outside the output root"
        assert job_ids, "some requests were accepted and ran"
        assert call(stub, "ListMergeJobs", merge_pb2.ListMergeJobsRequest(page_size=5)) == C.OK
    finally:
        channel.close()


@pytest.mark.parametrize("target", ["base_model", "merge_method", "t", "filter"])
def test_yaml_alias_bomb_is_refused_at_once(server, target: str) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.StartMerge(merge_pb2.StartMergeRequest(mergekit_yaml=yaml_bomb(target=target), output_path="bomb"), timeout=DEADLINE)
        assert info.value.code() == C.INVALID_ARGUMENT
        assert "expands to more than" in info.value.details()
    finally:
        channel.close()


# -- job queries ---------------------------------------------------------------------------------
JOB_IDS = st.one_of(
    st.text(max_size=64),
    st.sampled_from(["", "0" * 32, "../../etc/passwd", "' OR 1=1 --", "%", "_", "a\x00b", "j" * 100_000]),
    st.binary(max_size=32).map(lambda b: b.hex()),
)


def _token(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


PAGE_TOKENS = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            "!!!",
            "e30=",
            _token({"before": "x"}),
            _token({"before": -1}),
            _token({"before": 10**30}),
            _token({"before": 1, "state": "NOPE"}),
            _token([1, 2]),
            _token({"before": None}),
            _token({"before": 1.5e308}),
            base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
            "A" * 10_000,
        ]
    ),
)


def test_job_queries_with_random_ids_and_page_tokens(server, population) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        job_id=JOB_IDS,
        page_size=st.one_of(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.sampled_from([-1, 0, 1, 1000, 1001])),
        page_token=PAGE_TOKENS,
        state=st.integers(min_value=-3, max_value=9),
    )
    def check(job_id, page_size, page_token, state):
        assert call(stub, "GetMergeJob", merge_pb2.GetMergeJobRequest(job_id=job_id)) in (C.NOT_FOUND, C.INVALID_ARGUMENT)
        assert call(stub, "CancelMergeJob", merge_pb2.CancelMergeJobRequest(job_id=job_id)) in (C.NOT_FOUND, C.INVALID_ARGUMENT)
        assert call(stub, "WatchMergeJob", merge_pb2.WatchMergeJobRequest(job_id=job_id)) in (C.NOT_FOUND, C.INVALID_ARGUMENT)
        call(stub, "ListMergeJobs", merge_pb2.ListMergeJobsRequest(page_size=page_size, page_token=page_token, state=state))

    try:
        check()
        listed = stub.ListMergeJobs(merge_pb2.ListMergeJobsRequest(page_size=2), timeout=DEADLINE)
        assert list(listed.jobs) == []
    finally:
        channel.close()
