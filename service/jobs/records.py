"""The merge-job domain records: a request, a job's snapshot, its error, the job states; their JSON forms.

What the registry stores (`store`), the manager updates (`manager`) and the gRPC layer translates
(`server.merge_rpc`). Pure data: no I/O.
"""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import grpc

from kinship_service.checkpoints.sources import CheckpointSpec, HubRepo, LocalPath
from kinship_service.errors import status_code_number
from kinship_service.merge.parameters import MethodParameters
from kinship_service.merge.slerp import InterpolationSpec

QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
ACTIVE = (QUEUED, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = ACTIVE + FINAL


def _spec_to_json(spec: CheckpointSpec) -> dict[str, str]:
    if isinstance(spec, HubRepo):
        return {"hub": spec.repo_id, "revision": spec.revision}
    return {"path": spec.path}


def _spec_from_json(data: dict[str, str]) -> CheckpointSpec:
    if "hub" in data:
        return HubRepo(data["hub"], data.get("revision", ""))
    return LocalPath(data["path"])


@dataclass(frozen=True)
class MergeRequest:
    """A validated StartMerge request, in domain terms.

    The merge's inputs are `model_a`, `model_b`, then `more_inputs`, in the method's order (SLERP:
    A and B; task-vector methods: the base, then the models; linear: the models).
    """

    model_a: CheckpointSpec
    model_b: CheckpointSpec
    t: InterpolationSpec | None
    """SLERP's t; None for the other methods."""
    output_path: str
    request_id: str = ""
    out_dtype: str | None = None
    compute_cast: str | None = None
    max_shard_bytes: int = 0
    leading_slice: bool = False
    overwrite: bool = False
    num_layers: int | None = None
    base: CheckpointSpec | None = None
    """When set, the output is registered against this base before the job succeeds."""
    method: str = "slerp"
    more_inputs: tuple[CheckpointSpec, ...] = ()
    method_parameters: MethodParameters = field(default_factory=MethodParameters)
    model_count: int = 2
    """Merged models (the base not counted)."""

    @property
    def inputs(self) -> tuple[CheckpointSpec, ...]:
        """Every input in the method's order."""
        return (self.model_a, self.model_b, *self.more_inputs)

    @property
    def models(self) -> tuple[CheckpointSpec, ...]:
        """The merged models (the inputs after the base, for methods that take one)."""
        return self.inputs[len(self.inputs) - self.model_count :]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (the registry stores it; idempotency compares it)."""
        data = asdict(self)
        data["model_a"] = _spec_to_json(self.model_a)
        data["model_b"] = _spec_to_json(self.model_b)
        data["t"] = self.t.to_json() if self.t is not None else None
        data["base"] = _spec_to_json(self.base) if self.base is not None else None
        data["more_inputs"] = [_spec_to_json(s) for s in self.more_inputs]
        data["method_parameters"] = self.method_parameters.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MergeRequest:
        """The request `to_json` described."""
        values = dict(data)
        values["model_a"] = _spec_from_json(values["model_a"])
        values["model_b"] = _spec_from_json(values["model_b"])
        values["t"] = InterpolationSpec.from_json(values["t"]) if values.get("t") is not None else None
        values["base"] = _spec_from_json(values["base"]) if values.get("base") else None
        values["more_inputs"] = tuple(_spec_from_json(s) for s in values.get("more_inputs", []))
        values["method_parameters"] = MethodParameters.from_json(values.get("method_parameters", {}))
        return cls(**values)


def input_fields(request: MergeRequest) -> list[str]:
    """The request field each input came from, for error messages (`model_a`, `base`, `models[0]`...)."""
    if request.method == "slerp":
        return ["model_a", "model_b"]
    first_model = len(request.inputs) - request.model_count
    return ["base"] * first_model + [f"models[{i}]" for i in range(request.model_count)]


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as a google.rpc status."""
    code: int
    """google.rpc.Code number."""
    message: str
    reason: str


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job."""

    job_id: str
    request: MergeRequest
    state: str
    output_dir: str
    tmp_dir: str
    create_time: float
    start_time: float | None = None
    end_time: float | None = None
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    eta_seconds: float = 0.0
    error: JobError | None = None
    owner: str = ""
    version: int = 0

    @property
    def request_id(self) -> str:
        """The client's idempotency key ('' when none was given)."""
        return self.request.request_id

    def to_json(self) -> str:
        """The record as JSON text (without its in-memory version counter)."""
        data = asdict(self)
        data["request"] = self.request.to_json()
        data.pop("version")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        """The record `to_json` wrote."""
        data = json.loads(text)
        data["request"] = MergeRequest.from_json(data["request"])
        data["error"] = JobError(**data["error"]) if data.get("error") else None
        return cls(**data)

    def published(self, now: float) -> JobRecord:
        """This job SUCCEEDED at `now`: its runner published the whole output, then stopped
        (crash, kill, lost database) before it could record the end itself."""
        return replace(
            self,
            state=SUCCEEDED,
            end_time=now,
            eta_seconds=0.0,
            error=None,
            tensors_done=self.tensors_total,
            bytes_done=self.bytes_total,
        )


def job_error_from_os(exc: OSError) -> JobError:
    """The JobError of an I/O failure while writing a merge: disk full, file too large, not writable, or other I/O."""
    where = f" ({exc.filename})" if exc.filename else ""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return JobError(
            status_code_number(grpc.StatusCode.RESOURCE_EXHAUSTED),
            f"the disk is full while writing the merge{where}: {text}; no output was left behind; free space and start it again",
            "DISK_FULL",
        )
    if exc.errno == errno.EFBIG:
        return JobError(
            status_code_number(grpc.StatusCode.RESOURCE_EXHAUSTED),
            f"a file grew beyond the allowed size while writing the merge{where}: {text}; no output was left behind; "
            "lower max_shard_bytes or raise the file-size limit and start it again",
            "FILE_TOO_LARGE",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return JobError(
            status_code_number(grpc.StatusCode.PERMISSION_DENIED),
            f"the output location is not writable{where}: {text}; fix the permissions of KINSHIP_OUTPUT_ROOT and start it again",
            "OUTPUT_NOT_WRITABLE",
        )
    return JobError(
        status_code_number(grpc.StatusCode.UNAVAILABLE),
        f"an I/O error stopped the merge{where}: {text}; no output was left behind; start it again",
        "IO_ERROR",
    )


def page_query(table: str, placeholder: str, before_seq: int | None, state: str | None, limit: int) -> tuple[str, list[Any]]:
    """The SQL and arguments of a registry page (newest first, older than `before_seq`, optionally in
    one state), for either backend: `placeholder` is its parameter marker (`?` SQLite, `%s` psycopg)."""
    query = f"SELECT seq, record FROM {table} WHERE 1 = 1"
    args: list[Any] = []
    if before_seq is not None:
        query += f" AND seq < {placeholder}"
        args.append(before_seq)
    if state is not None:
        query += f" AND state = {placeholder}"
        args.append(state)
    query += f" ORDER BY seq DESC LIMIT {placeholder}"
    args.append(limit)
    return query, args
