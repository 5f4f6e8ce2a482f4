"""Admission control for heavy work (service/admission.py): bounds, coalescing, cancellation.

Pure tests of the executor with real threads; the work functions block on events the test
controls, so no test depends on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from kinship_service.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from kinship_service.server.admission import Admission


def never_cancelled() -> None:
    return None


class Gate:
    """A heavy work function that waits until released, counting how often it ran."""

    def __init__(self, result: object = "done") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.cancelled = threading.Event()
        self.result = result
        self._lock = threading.Lock()

    def __call__(self, check: Callable[[], None]) -> object:
        with self._lock:
            self.calls += 1
        self.started.set()
        while not self.release.wait(0.01):
            try:
                check()
            except Cancelled:
                self.cancelled.set()
                raise
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class Caller:
    """A caller whose own cancellation the test triggers (like a gRPC client cancelling)."""

    def __init__(self, exc: BaseException | None = None) -> None:
        self.gone = threading.Event()
        self.exc = exc or Cancelled("the call was cancelled")

    def check(self) -> None:
        if self.gone.is_set():
            raise self.exc


def wait_for(predicate: Callable[[], bool]) -> None:
    event = threading.Event()
    for _ in range(2000):
        if predicate():
            return
        event.wait(0.005)
    raise AssertionError("condition not reached")


def test_identical_requests_are_coalesced_into_one_computation() -> None:
    admission = Admission(workers=1, queue=0)
    gate = Gate(result={"value": 42})
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(admission.run, "key", gate, never_cancelled)
        gate.started.wait(10)
        others = [pool.submit(admission.run, "key", gate, never_cancelled) for _ in range(3)]
        wait_for(lambda: admission.snapshot()["waiters"] == 4)
        gate.release.set()
        results = [first.result(10)] + [f.result(10) for f in others]
    assert gate.calls == 1
    assert all(r is results[0] for r in results)
    assert admission.snapshot() == {"admitted": 0, "waiters": 0, "keys": 0}


def test_full_queue_answers_resource_exhausted_with_a_retry_hint() -> None:
    admission = Admission(workers=1, queue=1)
    running, queued = Gate(), Gate()
    with ThreadPoolExecutor(4) as pool:
        a = pool.submit(admission.run, "a", running, never_cancelled)
        running.started.wait(10)
        b = pool.submit(admission.run, "b", queued, never_cancelled)
        wait_for(lambda: admission.snapshot()["admitted"] == 2)
        with pytest.raises(ResourceExhausted) as info:
            admission.run("c", Gate(), never_cancelled)
        assert info.value.reason == "HEAVY_QUEUE_FULL"
        assert info.value.retry_after_seconds is not None and info.value.retry_after_seconds > 0
        # an identical request joins the computation in flight instead of being refused
        joined = pool.submit(admission.run, "a", running, never_cancelled)
        wait_for(lambda: admission.snapshot()["waiters"] == 3)
        assert not queued.started.is_set(), "one worker: the second computation waits"
        running.release.set()
        queued.release.set()
        assert a.result(10) == joined.result(10) == "done" and b.result(10) == "done"
    assert running.calls == 1 and queued.calls == 1
    # with room again, new work is admitted
    assert admission.run("c", lambda check: 7, never_cancelled) == 7


def test_waiting_callers_are_bounded_so_handler_threads_stay_free() -> None:
    admission = Admission(workers=1, queue=0, max_waiters=2)
    gate = Gate()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(admission.run, "k", gate, never_cancelled)
        gate.started.wait(10)
        second = pool.submit(admission.run, "k", gate, never_cancelled)
        wait_for(lambda: admission.snapshot()["waiters"] == 2)
        with pytest.raises(ResourceExhausted):
            admission.run("k", gate, never_cancelled)
        gate.release.set()
        assert first.result(10) == second.result(10) == "done"


def test_leader_cancelling_keeps_the_computation_for_the_followers() -> None:
    admission = Admission(workers=1, queue=0)
    gate = Gate()
    leader, follower = Caller(), Caller()
    with ThreadPoolExecutor(4) as pool:
        lead = pool.submit(admission.run, "k", gate, leader.check)
        gate.started.wait(10)
        follow = pool.submit(admission.run, "k", gate, follower.check)
        wait_for(lambda: admission.snapshot()["waiters"] == 2)
        leader.gone.set()
        with pytest.raises(Cancelled):
            lead.result(10)
        assert admission.snapshot()["waiters"] == 1
        assert not gate.cancelled.is_set()
        gate.release.set()
        assert follow.result(10) == "done"
    assert gate.calls == 1 and not gate.cancelled.is_set()


def test_computation_is_cancelled_when_nobody_waits_and_a_later_request_starts_afresh() -> None:
    admission = Admission(workers=1, queue=0)
    gate = Gate()
    a, b = Caller(), Caller(DeadlineExceeded("the deadline passed"))
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(admission.run, "k", gate, a.check)
        gate.started.wait(10)
        second = pool.submit(admission.run, "k", gate, b.check)
        wait_for(lambda: admission.snapshot()["waiters"] == 2)
        a.gone.set()
        b.gone.set()
        with pytest.raises(Cancelled):
            first.result(10)
        with pytest.raises(DeadlineExceeded):
            second.result(10)
        assert gate.cancelled.wait(10), "the abandoned computation stops at its next check"
    wait_for(lambda: admission.snapshot()["admitted"] == 0)
    fresh = Gate(result="again")
    fresh.release.set()
    assert admission.run("k", fresh, never_cancelled) == "again"
    assert fresh.calls == 1


def test_errors_reach_every_waiter_and_the_executor_lives_on() -> None:
    admission = Admission(workers=1, queue=2)
    gate = Gate(result=InvalidArgument("bad models", field="models"))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(admission.run, "k", gate, never_cancelled)]
        gate.started.wait(10)
        futures += [pool.submit(admission.run, "k", gate, never_cancelled) for _ in range(2)]
        wait_for(lambda: admission.snapshot()["waiters"] == 3)
        gate.release.set()
        for future in futures:
            with pytest.raises(InvalidArgument):
                future.result(10)
    assert gate.calls == 1
    assert admission.run("other", lambda check: "ok", never_cancelled) == "ok"


def test_a_caller_already_cancelled_starts_nothing() -> None:
    admission = Admission(workers=1, queue=0)
    caller = Caller()
    caller.gone.set()
    gate = Gate()
    with pytest.raises(Cancelled):
        admission.run("k", gate, caller.check)
    assert gate.calls == 0 and admission.snapshot()["admitted"] == 0


def test_no_more_than_workers_computations_run_at_once() -> None:
    admission = Admission(workers=2, queue=6)
    lock = threading.Lock()
    running = [0]
    peak = [0]
    release = threading.Event()

    def work(check: Callable[[], None]) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(admission.run, f"k{i}", work, never_cancelled) for i in range(8)]
        wait_for(lambda: admission.snapshot()["admitted"] == 8)
        wait_for(lambda: running[0] == 2)
        release.set()
        assert sum(f.result(10) for f in futures) == 8
    assert peak[0] == 2


# -- over gRPC: a real server whose heavy queue is full still answers light calls --------------
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402

from kinship_client.v1 import common_pb2, kinship_pb2, merge_pb2, recommend_pb2, service_pb2_grpc  # noqa: E402
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint  # noqa: E402
from kinship_service.server import admission as admission_module  # noqa: E402

# About 16M parameters (62 MiB per float32 file); 24 names hard-linked to 3 files make an exact
# pass over 300 pairs that runs for seconds, while the disk holds four files.
SHAPE = LlamaShape(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=4)


@pytest.fixture(scope="module")
def long_pass(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("admission-models")
    base = make_base(SHAPE, seed=0)
    base_dir = save_checkpoint(base, root / "base")
    distinct = [save_checkpoint(m, root / f"distinct{i}") for i, m in enumerate(make_family(base, 3, rho=0.5, seed=1))]
    del base
    models = []
    for i in range(24):
        directory = root / f"m{i:02d}"
        directory.mkdir()
        os.link(distinct[i % 3] / "model.safetensors", directory / "model.safetensors")
        models.append(directory)
    return root, base_dir, models


def _metric(counter, kind: str) -> float:
    return counter.labels(kind)._value.get()


def _exact(base: Path, models: list[Path]) -> kinship_pb2.KinshipRequest:
    return kinship_pb2.KinshipRequest(
        base=common_pb2.CheckpointRef(path=str(base)),
        models=[common_pb2.CheckpointRef(path=str(m)) for m in models],
        mode=common_pb2.KINSHIP_MODE_EXACT,
    )


def test_light_calls_are_answered_while_the_heavy_queue_is_full_and_coalescing_works_over_grpc(server_factory, long_pass) -> None:
    root, base, models = long_pass
    server = server_factory(allowed_roots=(root,), heavy_workers=1, heavy_queue=0, max_workers=8, chunk_bytes=4 * 2**20)
    admission = server.servicer.admission
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.KinshipServiceStub(channel)
    coalesced = _metric(admission_module.COALESCED, "kinship")
    abandoned = _metric(admission_module.ABANDONED, "kinship")
    try:
        long_request = _exact(base, models)
        leader = stub.Kinship.future(long_request, timeout=300)
        wait_for(lambda: admission.snapshot()["admitted"] == 1)
        # another heavy request: the queue (0 waiting) is full
        with pytest.raises(grpc.RpcError) as full:
            stub.Kinship(_exact(base, models[:2]), timeout=30)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "heavy work" in full.value.details()
        # the identical request joins the computation in flight
        follower = stub.Kinship.future(long_request, timeout=300)
        wait_for(lambda: admission.snapshot()["waiters"] == 2)
        assert _metric(admission_module.COALESCED, "kinship") == coalesced + 1
        # light calls are answered meanwhile
        names = [f"x{i}" for i in range(4)]
        stop = stub.ShouldStop(
            recommend_pb2.ShouldStopRequest(
                members=[recommend_pb2.PopulationMember(name=n, score=0.5 + i / 10) for i, n in enumerate(names)],
                top_k=3,
                known_kinship=[
                    recommend_pb2.KnownKinship(pair=recommend_pb2.MemberPair(first=a, second=b), value=0.95)
                    for k, a in enumerate(names)
                    for b in names[k + 1 :]
                ],
            ),
            timeout=10,
        )
        assert stop.stop
        assert list(stub.ListMergeJobs(merge_pb2.ListMergeJobsRequest(), timeout=10).jobs) == []
        with pytest.raises(grpc.RpcError) as no_fp:
            fingerprint = _exact(base, models[:2])
            fingerprint.mode = common_pb2.KINSHIP_MODE_FINGERPRINT
            stub.Kinship(fingerprint, timeout=10)
        assert no_fp.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # answered at once, not queued
        assert admission.snapshot()["admitted"] == 1, "the heavy pass was still running during the light calls"
        # the leader's caller cancels: the follower still waits, the computation goes on
        leader.cancel()
        wait_for(lambda: admission.snapshot()["waiters"] == 1)
        assert admission.snapshot()["admitted"] == 1
        # the last caller cancels too: the computation is abandoned and stops
        follower.cancel()
        wait_for(lambda: admission.snapshot() == {"admitted": 0, "waiters": 0, "keys": 0})
        assert _metric(admission_module.ABANDONED, "kinship") == abandoned + 1
        # and the server computes normally afterwards
        assert len(stub.Kinship(_exact(base, models[:2]), timeout=120).pairs) == 1
    finally:
        channel.close()
