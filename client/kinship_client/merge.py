"""Typed results and helpers of the merge-job RPCs (StartMerge, GetMergeJob, ListMergeJobs, CancelMergeJob, WatchMergeJob).

    op = client.merge("/models/a", "/models/b", t=0.5, output_path="merged/ab")
    info = op.wait(on_progress=lambda i: print(i.fraction))
    if info.state == "succeeded":
        print(info.output_path)

`t` is a float, a list of anchors interpolated across the layers (`[0, 0.5, 1]`), or a list of
filtered entries (`[{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]`, first match wins,
an entry without filter is the fallback) — mergekit's forms of the SLERP parameter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import grpc

from .choices import FINAL_JOB_STATES, JOB_STATE_NAMES, JobState, received
from .v1 import merge_pb2

if TYPE_CHECKING:
    from .client import KinshipClient

TLike = float | int | Sequence[float] | Sequence[Mapping[str, Any]] | merge_pb2.InterpolationFactor

MergeMethodName = Literal["slerp", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock"]
"""The merge methods of StartMerge (mergekit's names)."""
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethodName)


@dataclass(frozen=True)
class MethodOptions:
    """A merge method and its parameters, as start_merge takes them.

    `weight`/`density`/`lambda_`/`t` are global settings (any `TLike` form: a number, layer anchors,
    filtered entries); `weights`/`densities` give each model its own, in model order (None: the
    global one). `normalize`, `rescale`: None keeps mergekit's default of the method.
    """

    method: MergeMethodName
    models: Sequence[object] = ()
    weight: TLike | None = None
    weights: Sequence[TLike | None] | None = None
    density: TLike | None = None
    densities: Sequence[TLike | None] | None = None
    lambda_: TLike | None = None
    t: TLike | None = None
    normalize: bool | None = None
    rescale: bool | None = None
    seed: int = 0

    def fill(self, request: merge_pb2.StartMergeRequest, ref: Callable[[object, str], Any]) -> None:
        """Set `request`'s method oneof and models (raises ValueError for a parameter the method does not take)."""
        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; use one of: {', '.join(MERGE_METHODS)}")
        parameters = getattr(request, self.method)
        parameters.SetInParent()
        fields = parameters.DESCRIPTOR.fields_by_name
        given = {"weight": self.weight, "density": self.density, "lambda_factor": self.lambda_, "t": self.t}
        for name, value in given.items():
            if value is None:
                continue
            if name not in fields:
                raise ValueError(f"the {self.method} merge does not take {name.removesuffix('_factor')}")
            getattr(parameters, name).CopyFrom(interpolation_factor(value))
        for name in ("normalize", "rescale"):
            value = getattr(self, name)
            if value is not None:
                if name not in fields:
                    raise ValueError(f"the {self.method} merge has no {name} switch")
                setattr(parameters, name, value)
        if self.seed:
            if "seed" not in fields:
                raise ValueError(f"the {self.method} merge takes no seed (only dare_ties and dare_linear)")
            parameters.seed = self.seed
        for i, model in enumerate(self.models):
            entry = request.models.add()
            entry.checkpoint.CopyFrom(ref(model, f"models[{i}]"))
            for name, values in (("weight", self.weights), ("density", self.densities)):
                if values is not None and i < len(values) and values[i] is not None:
                    getattr(entry, name).CopyFrom(interpolation_factor(values[i]))  # type: ignore[arg-type]

def _factor_value(value: object) -> merge_pb2.FactorValue:
    if isinstance(value, bool):
        raise ValueError(f"t must be a number or a list of numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return merge_pb2.FactorValue(constant=float(value))
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return merge_pb2.FactorValue(gradient=merge_pb2.LayerGradient(anchors=[float(v) for v in value]))
    raise ValueError(f"t must be a number or a non-empty list of numbers, got {value!r}")


def _filtered_entries(t: object) -> list[Mapping[str, Any]] | None:
    """`t` as a list of {"filter", "value"} entries, or None when it is not one."""
    if isinstance(t, Sequence) and not isinstance(t, (str, bytes)) and t and all(isinstance(e, Mapping) for e in t):
        return [e for e in t if isinstance(e, Mapping)]
    return None


def interpolation_factor(t: TLike) -> merge_pb2.InterpolationFactor:
    """A float, a list of anchors, or a list of {"filter", "value"} entries -> InterpolationFactor.

    Raises:
        ValueError: `t` is none of these forms, or an entry has keys other than `filter` and `value`.
    """
    if isinstance(t, merge_pb2.InterpolationFactor):
        return t
    entries = _filtered_entries(t)
    if entries is not None:
        factor = merge_pb2.InterpolationFactor()
        for entry in entries:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ValueError(f"a t entry takes `value` and optionally `filter`, got {dict(entry)!r}")
            raw_filter = entry.get("filter") or ""
            factor.entries.append(
                merge_pb2.FilteredFactor(filter="" if raw_filter == "*" else str(raw_filter), value=_factor_value(entry["value"]))
            )
        return factor
    return merge_pb2.InterpolationFactor(entries=[merge_pb2.FilteredFactor(value=_factor_value(t))])


@dataclass(frozen=True)
class MergeError:
    """Why a job failed: the gRPC code name (e.g. `RESOURCE_EXHAUSTED`), message and machine reason."""

    code: str
    message: str
    reason: str


@dataclass(frozen=True)
class MergeJobInfo:
    """A merge job's state and progress. `raw` is the MergeJob proto."""

    job_id: str
    state: JobState
    output_path: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    eta_seconds: float
    error: MergeError | None
    request_id: str
    raw: merge_pb2.MergeJob = field(repr=False)

    @classmethod
    def from_proto(cls, job: merge_pb2.MergeJob) -> MergeJobInfo:
        """The MergeJobInfo of a MergeJob proto (raises ValueError for a state this client does not know)."""
        error = None
        if job.HasField("error") and job.error.code:
            code = next((c.name for c in grpc.StatusCode if c.value[0] == job.error.code), str(job.error.code))
            error = MergeError(code, job.error.message, job.error.reason)
        p = job.progress
        return cls(
            job_id=job.job_id,
            state=received(JOB_STATE_NAMES, job.state, "merge job state"),
            output_path=job.output_path,
            tensors_done=p.tensors_done,
            tensors_total=p.tensors_total,
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            eta_seconds=p.eta_seconds,
            error=error,
            request_id=job.request_id,
            raw=job,
        )

    @property
    def done(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINAL_JOB_STATES

    @property
    def fraction(self) -> float:
        """Bytes written as a fraction of the total (0 when unknown)."""
        return self.bytes_done / self.bytes_total if self.bytes_total else (1.0 if self.state == "succeeded" else 0.0)


class MergeOperation:
    """A started merge: `job_id`, `info` (as started) and `wait()` that follows WatchMergeJob."""

    def __init__(self, client: KinshipClient, info: MergeJobInfo) -> None:
        self._client = client
        self.info = info
        self.job_id = info.job_id

    def wait(self, timeout: float | None = None, on_progress: Callable[[MergeJobInfo], None] | None = None) -> MergeJobInfo:
        """Block until the job ends and return its final info (check `.state`; failures do not raise).

        Follows the WatchMergeJob stream (reconnecting if it breaks); `on_progress` gets every
        update. Raises TimeoutError when `timeout` seconds pass first (the job keeps running).
        """
        from .errors import KinshipRpcError

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"merge job {self.job_id} did not finish within {timeout} s (it keeps running)")
            try:
                for info in self._client.watch_merge_job(self.job_id, timeout=remaining if remaining is not None else 10 * 24 * 3600.0):
                    self.info = info
                    if on_progress is not None:
                        on_progress(info)
                    if info.done:
                        return info
            except KinshipRpcError as exc:
                if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the loop raises TimeoutError when our own deadline has passed
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                time.sleep(0.5)
            try:
                info = self._client.get_merge_job(self.job_id)
            except KinshipRpcError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(1.0)  # the server is restarting: keep trying until our deadline
                continue
            self.info = info
            if info.done:
                if on_progress is not None:
                    on_progress(info)
                return info


def iter_watch(responses: Iterator[merge_pb2.WatchMergeJobResponse]) -> Iterator[MergeJobInfo]:
    """The MergeJobInfo of each WatchMergeJob response."""
    for response in responses:
        yield MergeJobInfo.from_proto(response.job)


def format_bytes(n: float) -> str:
    """`n` bytes in binary units for display (`512 B`, `1.5 GiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_eta(seconds: float) -> str:
    """An ETA as `MM:SS` or `H:MM:SS`; `--:--` when unknown (0 or not finite)."""
    if not seconds or not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"
