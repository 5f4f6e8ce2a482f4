"""Shared state in PostgreSQL (KINSHIP_STATE_URL): two replicas, one database, a real PostgreSQL server.

Two `python -m kinship_service` processes with separate cache directories share a database
(and, as replicas on shared storage would, the model and output directories). They run as one
process each (KINSHIP_HEAVY_PROCESS=false): one process per replica keeps two replicas within a
busy 2-core machine's means (each heavy-work process would add its own kernel pool and start-up);
the front's light path over the database is tested in-process (`split_factory`). What one replica does, the other
sees: registrations answer FINGERPRINT there with no bytes read; a merge started on one is watched
to its end and cancelled from the other; a replica killed mid-merge leaves a job that is run
again or FAILED, never stuck RUNNING and never half-published. Losing the database answers
UNAVAILABLE and recovers when it is back; a wrong URL or a newer schema stops the server at start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import psycopg
import pytest
import torch
from safetensors import safe_open

from kinship_client import KinshipClient, KinshipRpcError
from kinship_service.checkpoints.sources import LocalPath
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.jobs.pg_store import Abandoned, Claimed, PgJobStore
from kinship_service.jobs.records import QUEUED, JobRecord, MergeRequest
from kinship_service.merge.output import temp_dir_for
from kinship_service.merge.slerp import InterpolationSpec
from kinship_service.state.database import Database, latest_version, migrate

from .conftest import InProcessSplit
from .postgres_server import PostgresServer, find_binaries
from .server_process import launch

SMALL = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
# About 63M parameters (250 MB per float32 model): with small work chunks its merge runs for seconds.
BIG = LlamaShape(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8, num_kv_heads=4)
SMALL_CHUNKS = 256 * 1024
LEASE_SECONDS = 3
DEADLINE = 300.0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): apt-get install postgresql (.ci/run does it)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def client(self) -> KinshipClient:
        return KinshipClient(self.address, timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    url: str
    a: Replica
    b: Replica
    models: dict[str, Path]
    tensors: dict[str, dict[str, torch.Tensor]]
    output_root: Path

    def replicas(self) -> list[Replica]:
        return [self.a, self.b]

    def runner_of(self, job_id: str) -> Replica:
        """The replica whose process holds the job's lease (the owner column: host:pid:nonce)."""
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT owner FROM merge_jobs WHERE job_id = %s", (job_id,)).fetchone()
        assert row is not None and row[0], f"job {job_id} has no runner"
        pid = int(row[0].rsplit(":", 2)[1])
        assert pid in (self.a.proc.pid, self.b.proc.pid), row
        return self.a if pid == self.a.proc.pid else self.b


def _replica_env(url: str, name: str, root: Path, models: Path, output_root: Path) -> dict[str, str]:
    return dict(
        os.environ,
        KINSHIP_STATE_URL=url,
        KINSHIP_CACHE_DIR=str(root / f"cache-{name}"),
        KINSHIP_OUTPUT_ROOT=str(output_root),
        KINSHIP_ALLOWED_ROOTS=str(models),
        KINSHIP_DEVICE="cpu",
        KINSHIP_PORT="0",
        KINSHIP_METRICS_PORT="0",
        KINSHIP_HOST="127.0.0.1",
        KINSHIP_LOG_FORMAT="text",
        KINSHIP_GRACE_SECONDS="0",
        KINSHIP_CHUNK_BYTES=str(SMALL_CHUNKS),
        KINSHIP_JOB_LEASE_SECONDS=str(LEASE_SECONDS),
        KINSHIP_HEAVY_PROCESS="false",
        KINSHIP_CPU_KERNEL="false",  # torch kernels: no numba compile per process on a shared 2-core machine
    )


@pytest.fixture(scope="module")
def cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    models = root / "models"
    base = make_base(SMALL, seed=0)
    a, b = make_family(base, 2, rho=0.4, seed=3)
    paths = {
        "base": save_checkpoint(base, models / "base"),
        "a": save_checkpoint(a, models / "a", config=SMALL.config(torch.float32)),
        "b": save_checkpoint(b, models / "b", config=SMALL.config(torch.float32)),
    }
    big = make_base(BIG, seed=0)
    paths["big_a"] = save_checkpoint(big, models / "big_a", config=BIG.config(torch.float32))
    g = torch.Generator().manual_seed(1)
    for name in big:
        big[name] = big[name] + 0.01 * torch.randn(big[name].shape, generator=g)
    paths["big_b"] = save_checkpoint(big, models / "big_b", config=BIG.config(torch.float32))
    del big
    url = postgres.new_database()
    output_root = root / "merges"  # shared storage (ReadWriteMany) in a real cluster
    replicas = []
    try:
        for name in ("a", "b"):
            log = root / f"replica-{name}.log"
            proc, address = launch(_replica_env(url, name, root, models, output_root), log, timeout=180)
            replicas.append(Replica(name, proc, address, log))
        yield Cluster(url, replicas[0], replicas[1], paths, {"base": base, "a": a, "b": b}, output_root)
    finally:
        for replica in replicas:
            replica.stop()


def _reference_pcc(base: dict[str, torch.Tensor], x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    """Pearson correlation of two task vectors over every floating tensor, in float64."""
    dx = torch.cat([(x[n].double() - base[n].double()).flatten() for n in sorted(base) if base[n].is_floating_point()])
    dy = torch.cat([(y[n].double() - base[n].double()).flatten() for n in sorted(base) if base[n].is_floating_point()])
    dx, dy = dx - dx.mean(), dy - dy.mean()
    return float((dx @ dy) / (dx.norm() * dy.norm()))


def _wait(replica: Replica, job_id: str, predicate, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + DEADLINE
    with replica.client() as client:
        while time.monotonic() < deadline:
            info = client.get_merge_job(job_id)
            if predicate(info):
                return info
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {what}")


def _tensor_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    return names


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------------------------
# What one replica computes, the other answers
# --------------------------------------------------------------------------------------------


def test_registered_on_one_replica_answers_fingerprint_on_the_other(cluster: Cluster) -> None:
    m = cluster.models
    with cluster.a.client() as client:
        for name in ("a", "b"):
            assert client.register_checkpoint(str(m[name]), str(m["base"])).fingerprint_bytes > 0
    with cluster.b.client() as client:
        result = client.kinship(str(m["base"]), [str(m["a"]), str(m["b"])], mode="fingerprint")
    assert result.mode == "fingerprint" and result.bytes_read == 0
    t = cluster.tensors
    assert abs(result.pairs[0].values.pcc - _reference_pcc(t["base"], t["a"], t["b"])) < 0.02
    with psycopg.connect(cluster.url) as conn:
        kinds = {kind for (kind,) in conn.execute("SELECT DISTINCT kind FROM kinship_cache")}
    assert "fp" in kinds and kinds <= {"fp", "pair", "hubref"}, kinds  # deltas stay in each node's diskcache
    with cluster.b.client() as client:  # B has no delta of its own: registering there reads the weights again
        again = client.register_checkpoint(str(m["a"]), str(m["base"]))
    assert not again.already_registered and again.delta_bytes > 0


def test_merge_started_on_one_replica_is_watched_to_succeeded_on_the_other(cluster: Cluster) -> None:
    m = cluster.models
    with cluster.a.client() as client:
        started = client.start_merge(str(m["a"]), str(m["b"]), t=0.5, output_path="shared/ab", request_id="req-ab")
    with cluster.b.client() as client:
        states = [info.state for info in client.watch_merge_job(started.job_id, timeout=DEADLINE)]
        assert states[-1] == "succeeded", states
        again = client.start_merge(str(m["a"]), str(m["b"]), t=0.5, output_path="shared/ab", request_id="req-ab")
        assert again.job_id == started.job_id  # idempotent by request_id across replicas
        listed, _ = client.list_merge_jobs()
        assert started.job_id in [j.job_id for j in listed]
    with cluster.a.client() as client:
        assert client.get_merge_job(started.job_id).state == "succeeded"
        with pytest.raises(KinshipRpcError) as reused:
            client.start_merge(str(m["b"]), str(m["a"]), t=0.5, output_path="shared/ba", request_id="req-ab")
        assert reused.value.reason == "REQUEST_ID_REUSED"
    out = cluster.output_root / "shared" / "ab"
    assert _tensor_names(out) == set(cluster.tensors["a"])
    assert _leftovers(out.parent) == ["ab"]


def test_cancel_from_the_replica_not_running_the_job(cluster: Cluster) -> None:
    m = cluster.models
    with cluster.a.client() as client:
        started = client.start_merge(str(m["big_a"]), str(m["big_b"]), t=0.5, output_path="cancel/out")
    _wait(cluster.a, started.job_id, lambda info: info.state == "running", "running")
    other = cluster.a if cluster.runner_of(started.job_id) is cluster.b else cluster.b
    with other.client() as client:
        cancelled = client.cancel_merge_job(started.job_id)
    assert cancelled.state == "cancelled", cancelled
    assert _leftovers(cluster.output_root / "cancel") == []


def test_one_active_job_per_output_across_replicas(cluster: Cluster) -> None:
    m = cluster.models
    with cluster.a.client() as client:
        first = client.start_merge(str(m["big_a"]), str(m["big_b"]), t=0.5, output_path="busy/out")
    with cluster.b.client() as client:
        with pytest.raises(KinshipRpcError) as busy:
            client.start_merge(str(m["big_a"]), str(m["big_b"]), t=0.3, output_path="busy/out")
        assert busy.value.reason == "OUTPUT_BUSY" and busy.value.field == "output_path"
        assert client.cancel_merge_job(first.job_id).state in ("cancelled", "succeeded")


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


def test_lost_database_answers_unavailable_and_recovers(cluster: Cluster, postgres: PostgresServer) -> None:
    m = cluster.models
    with cluster.a.client() as client:
        job = client.start_merge(str(m["a"]), str(m["b"]), t=0.25, output_path="outage/ab")
        assert list(client.watch_merge_job(job.job_id, timeout=DEADLINE))[-1].state == "succeeded"
    postgres.stop()
    try:
        for replica in cluster.replicas():
            with replica.client() as client:
                with pytest.raises(KinshipRpcError) as lost:
                    client.get_merge_job(job.job_id)
                assert lost.value.code == grpc.StatusCode.UNAVAILABLE and lost.value.reason == "STATE_UNAVAILABLE"
                with pytest.raises(KinshipRpcError) as lost_list:
                    client.list_merge_jobs()
                assert lost_list.value.reason == "STATE_UNAVAILABLE"
        assert all(r.proc.poll() is None for r in cluster.replicas())
    finally:
        postgres.start()
    for replica in cluster.replicas():
        with replica.client() as client:
            assert client.get_merge_job(job.job_id).state == "succeeded"


def test_front_answers_fingerprints_from_the_database_and_unavailable_without_it(
    postgres: PostgresServer, split_factory: Callable[..., InProcessSplit], model_root: Path
) -> None:
    """The production layout (front + heavy-work server, in-process): the front's light path reads the database."""
    base = make_base(SMALL, seed=1)
    a, b = make_family(base, 2, rho=0.6, seed=4)
    pb, pa, pbb = (save_checkpoint(t, model_root / n) for t, n in ((base, "base"), (a, "a"), (b, "b")))
    split = split_factory(state_url=postgres.new_database(), cpu_kernel=False)
    with KinshipClient(split.address, timeout=120) as client:
        for path in (pa, pbb):
            client.register_checkpoint(str(path), str(pb))  # in the heavy-work server: written to the database
        result = client.kinship(str(pb), [str(pa), str(pbb)], mode="fingerprint")  # answered by the front
        assert result.bytes_read == 0 and abs(result.pairs[0].values.pcc - _reference_pcc(base, a, b)) < 0.02
        split.front.front.answers.cache.forget_memory()  # the next answer must come from the database
        postgres.stop()
        try:
            with pytest.raises(KinshipRpcError) as lost:
                client.kinship(str(pb), [str(pa), str(pbb)], mode="fingerprint")
            assert lost.value.code == grpc.StatusCode.UNAVAILABLE and lost.value.reason == "STATE_UNAVAILABLE"
        finally:
            postgres.start()
        assert client.kinship(str(pb), [str(pa), str(pbb)], mode="fingerprint").bytes_read == 0


def test_database_lost_while_a_merge_runs_the_job_still_ends_succeeded(cluster: Cluster, postgres: PostgresServer) -> None:
    """The runner publishes while the database is away; the end is recorded once it is back, never stuck RUNNING."""
    m = cluster.models
    with cluster.a.client() as client:
        started = client.start_merge(str(m["big_a"]), str(m["big_b"]), t=0.5, output_path="outage/while-running")
    _wait(cluster.a, started.job_id, lambda info: info.state != "queued", "claimed")
    out = cluster.output_root / "outage" / "while-running"
    postgres.stop()
    try:
        deadline = time.monotonic() + DEADLINE
        while not (out / "README.md").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the runner goes on without the database and publishes
        assert (out / "README.md").exists(), "the merge never published while the database was away"
    finally:
        postgres.start()
    final = _wait(cluster.b, started.job_id, lambda info: info.state not in ("queued", "running"), "final")
    assert final.state == "succeeded", final.error
    assert _tensor_names(out) == _tensor_names(m["big_a"])
    assert [n for n in _leftovers(out.parent) if n.startswith(".kinship-")] == []


def test_replica_killed_mid_merge_job_is_rerun_or_failed(cluster: Cluster) -> None:
    """Last of the cluster tests: it kills the replica that runs the job."""
    m = cluster.models
    with cluster.b.client() as client:
        started = client.start_merge(str(m["big_a"]), str(m["big_b"]), t=0.5, output_path="killed/out")
    _wait(cluster.b, started.job_id, lambda info: info.state == "running", "running")
    victim = cluster.runner_of(started.job_id)
    survivor = cluster.a if victim is cluster.b else cluster.b
    victim.proc.kill()  # SIGKILL
    victim.proc.wait()
    final = _wait(survivor, started.job_id, lambda info: info.state not in ("queued", "running"), "final")
    out = cluster.output_root / "killed" / "out"
    assert final.state in ("succeeded", "failed"), final
    if final.state == "succeeded":
        with psycopg.connect(cluster.url) as conn:
            row = conn.execute("SELECT attempts FROM merge_jobs WHERE job_id = %s", (started.job_id,)).fetchone()
        assert row is not None and row[0] >= 2  # run again from the start after the kill
        assert _tensor_names(out) == _tensor_names(m["big_a"])
    else:
        assert final.error is not None and final.error.reason == "JOB_ATTEMPTS_EXHAUSTED"
        assert not out.exists()
    # The dead attempt's temporary directory was removed; nothing half-written was published.
    assert [n for n in _leftovers(out.parent) if n.startswith(".kinship-")] == []


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def _start_fails(url: str, tmp_path: Path) -> tuple[int, str]:
    env = dict(os.environ, KINSHIP_STATE_URL=url, KINSHIP_CACHE_DIR=str(tmp_path / "cache"), KINSHIP_PORT="0",
               KINSHIP_METRICS_PORT="0", KINSHIP_HOST="127.0.0.1", KINSHIP_LOG_FORMAT="text", KINSHIP_STATE_TIMEOUT_SECONDS="2")
    done = subprocess.run([sys.executable, "-m", "kinship_service"], env=env, capture_output=True, timeout=180)
    return done.returncode, done.stderr.decode() + done.stdout.decode()


def test_unreachable_or_wrong_database_url_stops_the_server(postgres: PostgresServer, tmp_path: Path) -> None:
    closed = f"postgresql://kinship:s3cret@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/postgres"
    wrong_db = postgres.url("no_such_database")
    for url in (closed, wrong_db):
        code, text = _start_fails(url, tmp_path)
        assert code != 0 and "KINSHIP_STATE_URL" in text and "Traceback" not in text, text
        assert "listening" not in text and "s3cret" not in text
    code, text = _start_fails("postgresql://kinship:s3cret@[::1/x", tmp_path)
    assert code != 0 and "KINSHIP_STATE_URL is not a URL libpq can parse" in text and "s3cret" not in text, text
    code, text = _start_fails("mysql://kinship@127.0.0.1/x", tmp_path)
    assert code == 2 and "KINSHIP_STATE_URL must be a postgresql://" in text and "Traceback" not in text, text


def test_schema_newer_than_the_code_refuses_to_start(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.new_database()
    migrate(Database(url))
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'from-the-future.sql')", (latest_version() + 1,))
    code, text = _start_fails(url, tmp_path)
    assert code != 0 and "newer than this server knows" in text and "KINSHIP_STATE_URL" in text and "Traceback" not in text, text


def test_replicas_starting_together_apply_each_migration_once(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    versions: list[int] = []
    starters = [threading.Thread(target=lambda: versions.append(migrate(Database(url)))) for _ in range(4)]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join(timeout=120)
    assert versions == [latest_version()] * 4
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v for (v,) in rows] == list(range(1, latest_version() + 1))


# --------------------------------------------------------------------------------------------
# The PostgreSQL job registry itself: claims, leases, attempts, cancel flags, owner-guarded writes
# --------------------------------------------------------------------------------------------


def _migrated(postgres: PostgresServer) -> Database:
    database = Database(postgres.new_database())
    migrate(database)
    return database


def _queued_record(tmp_path: Path, name: str) -> JobRecord:
    request = MergeRequest(LocalPath("/m/a"), LocalPath("/m/b"), InterpolationSpec.constant(0.5), name, request_id=f"r-{name}")
    out = tmp_path / name
    return JobRecord(f"job-{name}", request, QUEUED, str(out), str(temp_dir_for(out, f"job-{name}")), time.time())


def test_lease_expiry_reruns_then_fails_after_max_attempts(postgres: PostgresServer, tmp_path: Path) -> None:
    store = PgJobStore(_migrated(postgres))
    record = _queued_record(tmp_path, "out")
    assert store.insert(record) is None
    assert store.insert(replace(record, job_id="job-again")) == record  # the same request_id: the existing job
    first = store.claim("host:1:x", 0.0, 2)  # a lease of 0 s: expired for the next transaction
    assert isinstance(first, Claimed) and first.attempt == 1 and first.stale_tmp_dir is None
    second = store.claim("host:2:y", 0.0, 2)  # the first runner "died": run again in a directory of its own
    assert isinstance(second, Claimed) and second.attempt == 2
    assert second.stale_tmp_dir == Path(first.record.tmp_dir) and second.record.tmp_dir != first.record.tmp_dir
    store.save(replace(first.record, tensors_done=99))  # the old owner's write no longer reaches the job
    stored = store.get(record.job_id)
    assert stored is not None and stored.owner == "host:2:y" and stored.tensors_done == 0
    third = store.claim("host:3:z", 30.0, 2)
    assert isinstance(third, Abandoned) and third.record.state == "FAILED"
    assert third.record.error is not None and third.record.error.reason == "JOB_ATTEMPTS_EXHAUSTED"
    assert third.stale_tmp_dir == Path(second.record.tmp_dir)
    assert store.claim("host:3:z", 30.0, 2) is None


def _publish_as(job: JobRecord) -> Path:
    """What a runner leaves when it dies between publishing its output and recording SUCCEEDED."""
    out = Path(job.output_dir)
    out.mkdir(parents=True)
    (out / "README.md").write_text(f"---\ntags: [merge]\nkinship_job: {job.job_id}\n---\n\n# merge\n")
    (out / "model.safetensors").write_bytes(b"weights")
    return out


def test_claim_of_a_job_whose_output_names_it_records_succeeded(postgres: PostgresServer, tmp_path: Path) -> None:
    store = PgJobStore(_migrated(postgres))
    record, other = _queued_record(tmp_path, "pub"), _queued_record(tmp_path, "elsewhere")
    store.insert(record)
    first = store.claim("host:1:x", 0.0, 1)  # the runner that "dies" after publishing
    assert isinstance(first, Claimed)
    out = _publish_as(first.record)
    ended = store.claim("host:2:y", 30.0, 1)  # attempts exhausted, but the output is there and names the job
    assert isinstance(ended, Abandoned) and ended.record.state == "SUCCEEDED" and ended.record.error is None
    assert ended.stale_tmp_dir == Path(first.record.tmp_dir)
    stored = store.get(record.job_id)
    assert stored is not None and stored.state == "SUCCEEDED"
    assert (out / "model.safetensors").read_bytes() == b"weights"  # left as published, not run again
    # An output that names another job is not adopted: the job is run again as usual.
    store.insert(other)
    claimed = store.claim("host:1:x", 0.0, 3)
    assert isinstance(claimed, Claimed)
    Path(claimed.record.output_dir).mkdir(parents=True)
    (Path(claimed.record.output_dir) / "README.md").write_text("---\nkinship_job: job-someone-else\n---\n")
    again = store.claim("host:2:y", 30.0, 3)
    assert isinstance(again, Claimed) and again.attempt == 2


def test_cancel_flag_reaches_the_runner_through_its_lease_renewal(postgres: PostgresServer, tmp_path: Path) -> None:
    store = PgJobStore(_migrated(postgres))
    running, queued = _queued_record(tmp_path, "run"), _queued_record(tmp_path, "wait")
    store.insert(running)
    store.insert(queued)
    claimed = store.claim("host:1:x", 30.0, 3)
    assert isinstance(claimed, Claimed) and claimed.record.job_id == running.job_id
    assert store.renew("host:1:x", 30.0) == {running.job_id: False}
    assert store.request_cancel(queued.job_id).state == "CANCELLED"  # queued: cancelled at once
    assert store.request_cancel(running.job_id).state == "RUNNING"  # running: flagged for its runner
    assert store.renew("host:1:x", 30.0) == {running.job_id: True}
    assert store.claim("host:2:y", 30.0, 3) is None  # the lease holds; the cancelled one is not claimable
    assert store.queued() == 0
