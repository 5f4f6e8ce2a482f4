"""The two-process server (service/front.py): a real `python -m kinship_service` with its heavy-work process.

What the split must not change for a caller: results (checked against a float64 reference),
status codes with their rich details, streaming, tokens and metrics. What it adds: the heavy-work
process can die (OOM kill) while light calls go on, it is restarted, and it never outlives the front.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.numpy import load_file

from kinship_client import KinshipClient, KinshipRpcError
from kinship_client.population import Member
from kinship_client.v1 import common_pb2, kinship_pb2, merge_pb2, service_pb2_grpc
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint

from .conftest import SMALL
from .free_ports import free_port
from .server_process import launch

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

# About 16M parameters (62 MiB in float32): a pass over 24 of them takes seconds, long enough to cancel.
BIG = LlamaShape(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=4)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(predicate, seconds: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Split:
    """A running two-process server: the front's Popen, its address, its metrics port and its files."""

    def __init__(self, root: Path, work: Path, *, own_session: bool = False, preexec_fn=None, **env: str) -> None:
        self.root = root
        self.work = work
        self.metrics_port = free_port()
        environment = dict(os.environ)
        environment.update(
            KINSHIP_HOST="127.0.0.1",
            KINSHIP_PORT="0",
            KINSHIP_METRICS_PORT=str(self.metrics_port),
            KINSHIP_ALLOWED_ROOTS=str(root),
            KINSHIP_CACHE_DIR=str(work / "cache"),
            KINSHIP_OUTPUT_ROOT=str(work / "merges"),
            KINSHIP_DEVICE="cpu",
            KINSHIP_LOG_FORMAT="text",
            KINSHIP_GRACE_SECONDS="5",
            KINSHIP_HEAVY_PROCESS="true",
        )
        environment.update(env)
        self.log = work / "server.log"
        self.process, self.address = launch(environment, self.log, preexec_fn=os.setsid if own_session else preexec_fn)
        (heavy,) = _children(self.process.pid)
        self.heavy_pid = heavy

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def metric(self, line_prefix: str) -> float:
        values = [float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines() if line.startswith(line_prefix)]
        assert len(values) <= 1, f"{line_prefix} appears {len(values)} times"
        return values[0] if values else 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("front-models")
    base = make_base(SMALL, seed=0)
    save_checkpoint(base, root / "base")
    for i, model in enumerate(make_family(base, 3, rho=0.5, seed=1)):
        save_checkpoint(model, root / f"m{i}")
    return root


@pytest.fixture(scope="module")
def split(family_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Split]:
    running = Split(family_root, tmp_path_factory.mktemp("front-work"))
    yield running
    running.stop()


def reference_pcc(root: Path, a: str, b: str) -> float:
    """Float64 PCC of two task vectors over every tensor (numpy, independent of the service)."""
    base = load_file(str(root / "base" / "model.safetensors"))
    first = load_file(str(root / a / "model.safetensors"))
    second = load_file(str(root / b / "model.safetensors"))
    names = sorted(base)
    x = np.concatenate([(first[n].astype(np.float64) - base[n].astype(np.float64)).ravel() for n in names])
    y = np.concatenate([(second[n].astype(np.float64) - base[n].astype(np.float64)).ravel() for n in names])
    return float(np.corrcoef(x, y)[0, 1])


def test_heavy_calls_are_forwarded_and_light_calls_answered_with_the_same_results(split: Split) -> None:
    root = split.root
    models = [str(root / f"m{i}") for i in range(3)]
    before = split.metric("kinship_checkpoint_bytes_read_total")
    with KinshipClient(split.address, timeout=120) as client:
        exact = client.kinship(str(root / "base"), models, mode="exact")
        assert exact.mode == "exact" and exact.bytes_read > 0
        for pair in exact.pairs:
            expected = reference_pcc(root, f"m{pair.first}", f"m{pair.second}")
            assert math.isclose(pair.values.pcc, expected, rel_tol=1e-9, abs_tol=1e-12)
        # asked again, the front answers from the cached pair results: no heavy work admitted
        admitted = split.metric('kinship_heavy_admitted_total{kind="kinship"}')
        again = client.kinship(str(root / "base"), models, mode="exact")
        assert again.bytes_read == 0 and [p.values for p in again.pairs] == [p.values for p in exact.pairs]
        assert client.kinship(str(root / "base"), models, mode="auto").bytes_read == 0
        assert split.metric('kinship_heavy_admitted_total{kind="kinship"}') == admitted
        for model in models:
            client.register_checkpoint(model, str(root / "base"))  # forwarded: heavy
        estimate = client.kinship(str(root / "base"), models, mode="fingerprint")  # answered by the front
        assert estimate.mode == "fingerprint" and estimate.bytes_read == 0
        for pair in estimate.pairs:
            assert abs(pair.values.pcc - reference_pcc(root, f"m{pair.first}", f"m{pair.second}")) < 0.02
        # ShouldStop needing exact kinship is forwarded; with every value given it is answered in front
        members = [Member(name=f"m{i}", score=0.5 + i / 10, checkpoint=models[i]) for i in range(3)]
        forwarded = client.should_stop(members, top_k=3, base=str(root / "base"), mode="exact")
        assert forwarded.mode == "exact"
        assert math.isclose(forwarded.aggregated_kinship, sum(p.values.pcc for p in exact.pairs) / 3, rel_tol=1e-9)
        given = client.should_stop(
            [Member(name=m.name, score=m.score) for m in members],
            top_k=3,
            known_kinship={(f"m{p.first}", f"m{p.second}"): p.values.pcc for p in exact.pairs},
        )
        assert math.isclose(given.aggregated_kinship, forwarded.aggregated_kinship, rel_tol=1e-12)
    # the heavy process's metrics are served on the front's port, the RPC counts once
    assert split.metric("kinship_checkpoint_bytes_read_total") > before
    handled = 'grpc_server_handled_total{grpc_code="OK",grpc_method="RegisterCheckpoint",grpc_service="kinship.v1.KinshipService",grpc_type="unary"}'
    assert split.metric(handled) == 3


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling classes")
def test_only_heavy_threads_run_in_idle_time_the_rest_at_nice_values(split: Split) -> None:
    """The front and the heavy process's handler threads never SCHED_IDLE (a busy machine starved them so);
    heavy threads (nice 15 and below) SCHED_IDLE where they may leave it again (priority.py's guard), else nice only."""
    from .test_priority import _can_leave_idle_class, _policies

    for tid, (policy, _) in _policies(split.process.pid).items():
        assert policy == os.SCHED_OTHER, tid
    front_nice = os.getpriority(os.PRIO_PROCESS, split.process.pid)
    heavy = _policies(split.heavy_pid)
    assert heavy[split.heavy_pid] == (os.SCHED_OTHER, min(19, front_nice + 5))
    heavy_nice = min(19, front_nice + 15)
    for tid, (policy, nice) in heavy.items():
        assert policy in (os.SCHED_OTHER, os.SCHED_IDLE), tid
        if policy == os.SCHED_IDLE:
            assert nice >= heavy_nice, (tid, nice)
    assert split.metric("kinship_heavy_idle_class") == (1 if _can_leave_idle_class() else 0)


def test_errors_keep_their_code_message_and_details_through_the_front(split: Split) -> None:
    root = split.root
    with KinshipClient(split.address, timeout=60) as client:
        with pytest.raises(KinshipRpcError) as missing_base:  # raised in the heavy process
            client._call(  # noqa: SLF001 - the typed client always sends a base
                client.stub.RegisterCheckpoint,
                kinship_pb2.RegisterCheckpointRequest(checkpoint=common_pb2.CheckpointRef(path=str(root / "m0"))),
                30,
            )
        assert missing_base.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert missing_base.value.field == "base" and "base is required" in missing_base.value.message
        with pytest.raises(KinshipRpcError) as outside:  # raised in the front
            client.kinship("/etc", [str(root / "m0"), str(root / "m1")], mode="fingerprint")
        assert outside.value.code == grpc.StatusCode.PERMISSION_DENIED and outside.value.field == "base"
        with pytest.raises(KinshipRpcError) as unknown_job:
            client.get_merge_job("no-such-job")
        assert unknown_job.value.code == grpc.StatusCode.NOT_FOUND
    # bytes that are no KinshipRequest: a status, not a crash; calls without a deadline work both ways
    with grpc.insecure_channel(split.address) as channel:
        stub = service_pb2_grpc.KinshipServiceStub(channel)
        for mode in (common_pb2.KINSHIP_MODE_EXACT, common_pb2.KINSHIP_MODE_FINGERPRINT):
            no_deadline = kinship_pb2.KinshipRequest(
                base=common_pb2.CheckpointRef(path=str(root / "base")),
                models=[common_pb2.CheckpointRef(path=str(root / "m0")), common_pb2.CheckpointRef(path=str(root / "m2"))],
                mode=mode,
            )
            try:
                assert len(stub.Kinship(no_deadline).pairs) == 1
            except grpc.RpcError as error:  # FINGERPRINT before registration: a precise status
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        raw = channel.unary_unary("/kinship.v1.KinshipService/Kinship")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff\xff", timeout=10)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_merge_jobs_run_and_stream_progress_through_the_front(split: Split) -> None:
    root = split.root
    with KinshipClient(split.address, timeout=120) as client:
        operation = client.merge(str(root / "m0"), str(root / "m1"), t=0.3, output_path="front/merged", overwrite=True)
        updates = list(client.watch_merge_job(operation.job_id))  # a server stream, forwarded message by message
        assert updates[-1].state == "succeeded"
        jobs, _ = client.list_merge_jobs()
        assert operation.job_id in [j.job_id for j in jobs]
    merged = load_file(str(split.work / "merges" / "front" / "merged" / "model.safetensors"))
    a = load_file(str(root / "m0" / "model.safetensors"))
    assert set(merged) == set(a)


def test_a_killed_heavy_process_is_restarted_while_light_calls_go_on(family_root: Path, tmp_path: Path) -> None:
    running = Split(family_root, tmp_path)
    try:
        models = [str(family_root / f"m{i}") for i in range(2)]
        with KinshipClient(running.address, timeout=60) as client:
            for model in models:
                client.register_checkpoint(model, str(family_root / "base"))
            first = running.heavy_pid
            os.kill(first, signal.SIGKILL)  # as the kernel's OOM killer would
            _wait(lambda: not _alive(first), what="the heavy process to die")
            # light: still answered by the front
            assert client.kinship(str(family_root / "base"), models, mode="fingerprint").mode == "fingerprint"
            # heavy: UNAVAILABLE (retryable) until the restart, then served again
            outcomes: list[str] = []

            def heavy_served() -> bool:
                try:
                    client.kinship(str(family_root / "base"), models, mode="exact", timeout=30)
                    return True
                except KinshipRpcError as error:
                    outcomes.append(error.code.name)
                    assert error.code == grpc.StatusCode.UNAVAILABLE, error
                    return False

            _wait(heavy_served, 90, "the heavy process to be back")
            assert set(outcomes) <= {"UNAVAILABLE"}
            (second,) = _children(running.process.pid)
            assert second != first
            assert running.metric("kinship_heavy_process_restarts_total") == 1
            assert running.metric("kinship_heavy_process_up") == 1
        with grpc.insecure_channel(running.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert "exited unexpectedly" in running.log.read_text()
    finally:
        running.stop()
    assert running.process.returncode == 0


def test_the_heavy_process_never_outlives_the_front(family_root: Path, tmp_path: Path) -> None:
    running = Split(family_root, tmp_path)
    heavy = running.heavy_pid
    running.process.kill()  # SIGKILL: no chance to stop its child
    running.process.wait()
    _wait(lambda: not _alive(heavy), 30, "the orphaned heavy process to exit")


def test_a_heavy_process_that_cannot_start_stops_the_front_with_its_reason(family_root: Path, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "cache-file"
    not_a_directory.write_text("a file where the cache directory should be")
    env = dict(os.environ, KINSHIP_HOST="127.0.0.1", KINSHIP_PORT="0", KINSHIP_METRICS_PORT="0",
               KINSHIP_ALLOWED_ROOTS=str(family_root), KINSHIP_CACHE_DIR=str(not_a_directory),
               KINSHIP_OUTPUT_ROOT=str(tmp_path / "merges"), KINSHIP_DEVICE="cpu", KINSHIP_LOG_FORMAT="text",
               KINSHIP_HEAVY_PROCESS="true")
    result = subprocess.run([sys.executable, "-m", "kinship_service"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot open the cache" in result.stderr and "the heavy-work process did not start" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_ctrl_c_in_a_terminal_stops_both_processes_in_order(family_root: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole process group: the heavy-work process leaves it to the front."""
    running = Split(family_root, tmp_path, own_session=True)
    heavy = running.heavy_pid
    os.killpg(running.process.pid, signal.SIGINT)
    assert running.process.wait(timeout=60) == 0
    _wait(lambda: not _alive(heavy), 30, "the heavy process to exit")
    log = running.log.read_text()
    assert "exited unexpectedly" not in log and "Traceback" not in log, log


def test_tokens_are_checked_by_the_front_for_light_and_forwarded_calls(family_root: Path, tmp_path: Path) -> None:
    running = Split(family_root, tmp_path, KINSHIP_AUTH_TOKEN="s3cret-token")
    try:
        models = [str(family_root / f"m{i}") for i in range(2)]
        with KinshipClient(running.address, timeout=60) as anonymous:
            for mode in ("fingerprint", "exact"):
                with pytest.raises(KinshipRpcError) as refused:
                    anonymous.kinship(str(family_root / "base"), models, mode=mode)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with KinshipClient(running.address, timeout=60, token="s3cret-token") as client:
            assert client.kinship(str(family_root / "base"), models, mode="exact").mode == "exact"
        with grpc.insecure_channel(running.address) as channel:  # health and reflection stay open for probes
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert "kinship.v1.KinshipService" in {s.name for s in listed[0].list_services_response.service}
            # without a token even an unknown method is refused before it is named UNIMPLEMENTED; with one it is
            with pytest.raises(grpc.RpcError) as unknown:
                channel.unary_unary("/kinship.v1.KinshipService/NoSuchMethod")(b"", timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as unimplemented:
                channel.unary_unary("/kinship.v1.KinshipService/NoSuchMethod")(
                    b"", timeout=10, metadata=(("authorization", "Bearer s3cret-token"),)
                )
            assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
            watch = service_pb2_grpc.KinshipServiceStub(channel).WatchMergeJob(merge_pb2.WatchMergeJobRequest(job_id="x"), timeout=10)
            with pytest.raises(grpc.RpcError) as stream_refused:  # a streaming call without a token
                list(watch)
            assert stream_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # refusals are counted like any other call (twice Kinship, once WatchMergeJob)
        refused_kinship = 'grpc_server_handled_total{grpc_code="Unauthenticated",grpc_method="Kinship",grpc_service="kinship.v1.KinshipService",grpc_type="unary"}'
        assert running.metric(refused_kinship) == 2
        refused_watch = 'grpc_server_handled_total{grpc_code="Unauthenticated",grpc_method="WatchMergeJob",grpc_service="kinship.v1.KinshipService",grpc_type="server_stream"}'
        assert running.metric(refused_watch) == 1
    finally:
        running.stop()


def test_a_cancelled_forwarded_call_stops_the_work_in_the_heavy_process(split: Split, tmp_path: Path) -> None:
    root = split.root
    base = make_base(BIG, seed=5)
    big = [save_checkpoint(model, root / f"cancel{i}") for i, model in enumerate(make_family(base, 2, rho=0.5, seed=6))]
    save_checkpoint(base, root / "cancel-base")
    del base
    abandoned = split.metric('kinship_heavy_abandoned_total{kind="kinship"}')
    with grpc.insecure_channel(split.address) as channel:
        stub = service_pb2_grpc.KinshipServiceStub(channel)
        request = kinship_pb2.KinshipRequest(
            base=common_pb2.CheckpointRef(path=str(root / "cancel-base")),
            models=[common_pb2.CheckpointRef(path=str(p)) for p in big * 12],  # 24 x 62 MiB: seconds of work
            mode=common_pb2.KINSHIP_MODE_EXACT,
        )
        call = stub.Kinship.future(request, timeout=120)
        _wait(lambda: split.metric("kinship_heavy_running") >= 1 or call.done(), 60, "the pass to start")
        if call.done():
            pytest.skip("the pass finished before it could be cancelled (very fast machine)")
        call.cancel()
    _wait(lambda: split.metric('kinship_heavy_abandoned_total{kind="kinship"}') > abandoned, 60, "the work to be abandoned")
    _wait(lambda: split.metric("kinship_heavy_running") == 0, 60, "the heavy executor to be idle")


def test_a_request_seen_before_is_answered_from_the_files_as_they_are_now(split: Split) -> None:
    """The front keeps validated queries by their bytes (light.QueryMemo), never answers: a changed file shows at once."""
    root = split.root
    models = []
    for i in range(2):
        target = root / f"memo{i}"
        target.mkdir(exist_ok=True)
        shutil.copyfile(root / f"m{i}" / "model.safetensors", target / "model.safetensors")
        models.append(str(target))
    with KinshipClient(split.address, timeout=60) as client:
        for model in models:
            client.register_checkpoint(model, str(root / "base"))
        request = kinship_pb2.KinshipRequest(
            base=common_pb2.CheckpointRef(path=str(root / "base")),
            models=[common_pb2.CheckpointRef(path=m) for m in models],
            mode=common_pb2.KINSHIP_MODE_FINGERPRINT,
        ).SerializeToString()
        with grpc.insecure_channel(split.address) as channel:
            call = channel.unary_unary("/kinship.v1.KinshipService/Kinship")
            first = kinship_pb2.KinshipResponse.FromString(call(request, timeout=30))
            assert kinship_pb2.KinshipResponse.FromString(call(request, timeout=30)).pairs == first.pairs
            os.utime(Path(models[1]) / "model.safetensors", ns=(1, 1))  # a new identity: its fingerprint no longer applies
            with pytest.raises(grpc.RpcError) as missing:
                call(request, timeout=30)
            assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "models[1]" in (missing.value.details() or "")
