"""Translation between the merge-job protos (kinship.v1 merge.proto) and the domain records of `jobs`.

Part of the gRPC layer (kept out of api.py so the merge RPCs stay a few lines there): validates
a StartMergeRequest into a `MergeRequest`, and turns `JobRecord`s into `MergeJob` messages.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import timestamp_pb2

from kinship_client.v1 import common_pb2, merge_pb2
from kinship_service.checkpoints.sources import CheckpointSpec
from kinship_service.errors import InvalidArgument
from kinship_service.jobs.records import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    MergeRequest,
)
from kinship_service.merge.mergekit_config import MethodConfig, check_models, model_spec_from_name, parse_mergekit_yaml
from kinship_service.merge.methods import get_method
from kinship_service.merge.parameters import MethodParameters
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.slerp import FactorEntry, InterpolationSpec, validate_spec
from kinship_service.server.refs import ref_from_spec, spec_from_ref

_STATE_TO_PROTO = {
    QUEUED: merge_pb2.MERGE_JOB_STATE_QUEUED,
    RUNNING: merge_pb2.MERGE_JOB_STATE_RUNNING,
    SUCCEEDED: merge_pb2.MERGE_JOB_STATE_SUCCEEDED,
    FAILED: merge_pb2.MERGE_JOB_STATE_FAILED,
    CANCELLED: merge_pb2.MERGE_JOB_STATE_CANCELLED,
}
_STATE_FROM_PROTO: dict[int, str] = {v: k for k, v in _STATE_TO_PROTO.items()}
_DTYPES = {
    merge_pb2.DTYPE_FLOAT32: "F32",
    merge_pb2.DTYPE_FLOAT16: "F16",
    merge_pb2.DTYPE_BFLOAT16: "BF16",
}


def state_filter(value: int) -> str | None:
    """ListMergeJobsRequest.state -> a state name, None for all."""
    if value == merge_pb2.MERGE_JOB_STATE_UNSPECIFIED:
        return None
    if value not in _STATE_FROM_PROTO:
        raise InvalidArgument(f"unknown state {value}", field="state")
    return _STATE_FROM_PROTO[value]


def spec_from_factor(factor: merge_pb2.InterpolationFactor, field: str = "t", validate: bool = True) -> InterpolationSpec:
    """An InterpolationFactor proto as an InterpolationSpec (validated as a t unless `validate` is False: the method checks ranges)."""
    entries = []
    for i, entry in enumerate(factor.entries):
        which = entry.value.WhichOneof("value")
        where = f"{field}.entries[{i}].value"
        if which == "constant":
            entries.append(FactorEntry(entry.filter, (entry.value.constant,), False))
        elif which == "gradient":
            if not entry.value.gradient.anchors:
                raise InvalidArgument(f"{where}.gradient has no anchors", field=where)
            entries.append(FactorEntry(entry.filter, tuple(entry.value.gradient.anchors), True))
        else:
            raise InvalidArgument(f"{where} is not set: give a constant or a gradient", field=where)
    spec = InterpolationSpec(tuple(entries))
    return validate_spec(spec, field) if validate else spec


def factor_from_spec(spec: InterpolationSpec) -> merge_pb2.InterpolationFactor:
    """An InterpolationSpec as the InterpolationFactor proto (the inverse of `spec_from_factor`)."""
    factor = merge_pb2.InterpolationFactor()
    for entry in spec.entries:
        value = (
            merge_pb2.FactorValue(gradient=merge_pb2.LayerGradient(anchors=list(entry.anchors)))
            if entry.gradient
            else merge_pb2.FactorValue(constant=entry.anchors[0])
        )
        factor.entries.append(merge_pb2.FilteredFactor(filter=entry.filter, value=value))
    return factor


def merge_request(request: merge_pb2.StartMergeRequest, allowed_roots: tuple[Path, ...]) -> MergeRequest:
    """Validate a StartMergeRequest (INVALID_ARGUMENT naming the field) into a MergeRequest."""
    if request.dtype not in (merge_pb2.DTYPE_UNSPECIFIED, *_DTYPES):
        raise InvalidArgument(f"unknown dtype {request.dtype}", field="dtype")
    if request.max_shard_bytes < 0:
        raise InvalidArgument("max_shard_bytes must be >= 0 (0: the default 5 GB)", field="max_shard_bytes")
    policy = request.shape_mismatch_policy
    if policy not in (
        common_pb2.SHAPE_MISMATCH_POLICY_UNSPECIFIED,
        common_pb2.SHAPE_MISMATCH_POLICY_ERROR,
        common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
    ):
        raise InvalidArgument("merges take ERROR or LEADING_SLICE as shape_mismatch_policy", field="shape_mismatch_policy")
    if len(request.request_id) > 200:
        raise InvalidArgument("request_id is longer than 200 characters", field="request_id")
    out_dtype = _DTYPES.get(request.dtype)
    compute_cast = None
    num_layers = None
    if request.WhichOneof("method") is not None:
        return _method_request(request, out_dtype, policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE)
    if request.models:
        raise InvalidArgument("models takes a method (set one of the method parameters, e.g. slerp or ties)", field="models")
    if request.mergekit_yaml:
        given = [f for f in ("model_a", "model_b", "t") if request.HasField(f)]
        if given:
            raise InvalidArgument(
                f"give either mergekit_yaml or model_a/model_b/t, not both (also set: {', '.join(given)})", field="mergekit_yaml"
            )
        config = parse_mergekit_yaml(request.mergekit_yaml)
        if isinstance(config, MethodConfig):
            return _config_request(request, config, allowed_roots, out_dtype, policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE)
        model_a = model_spec_from_name(config.model_a, allowed_roots)
        model_b = model_spec_from_name(config.model_b, allowed_roots)
        spec = config.t
        out_dtype = out_dtype or config.out_dtype or config.dtype
        compute_cast = config.dtype
        num_layers = config.num_layers
    else:
        for name in ("model_a", "model_b", "t"):
            if not request.HasField(name):
                raise InvalidArgument(f"{name} is required (or give mergekit_yaml)", field=name)
        model_a = spec_from_ref(request.model_a, "model_a")
        model_b = spec_from_ref(request.model_b, "model_b")
        spec = spec_from_factor(request.t)
    base = spec_from_ref(request.base, "base") if request.HasField("base") else None
    return MergeRequest(
        base=base,
        model_a=model_a,
        model_b=model_b,
        t=spec,
        output_path=request.output_path,
        request_id=request.request_id,
        out_dtype=out_dtype,
        compute_cast=compute_cast,
        max_shard_bytes=request.max_shard_bytes,
        leading_slice=policy == common_pb2.SHAPE_MISMATCH_POLICY_LEADING_SLICE,
        overwrite=request.overwrite,
        num_layers=num_layers,
    )


_SWITCHES = ("normalize", "rescale")


def _method_request(request: merge_pb2.StartMergeRequest, out_dtype: str | None, leading_slice: bool) -> MergeRequest:
    """A StartMergeRequest with `method` set: models from `models`, parameters from the method's message."""
    name = request.WhichOneof("method")
    assert name is not None
    get_method(name)  # INVALID_ARGUMENT for a method this server does not know
    given = [f for f in ("model_a", "model_b", "t") if request.HasField(f)]
    if given or request.mergekit_yaml:
        raise InvalidArgument(
            f"with a method the models come from `models`; do not also set {', '.join(given) or 'mergekit_yaml'}", field="models"
        )
    parameters = getattr(request, name)
    global_settings = {}
    for field_name in ("t", "weight", "density", "lambda_factor"):
        if field_name in parameters.DESCRIPTOR.fields_by_name and parameters.HasField(field_name):
            key = "lambda" if field_name == "lambda_factor" else field_name
            global_settings[key] = spec_from_factor(getattr(parameters, field_name), f"{name}.{field_name}", validate=False)
    switches = {s: getattr(parameters, s) for s in _SWITCHES if s in parameters.DESCRIPTOR.fields_by_name and parameters.HasField(s)}
    seed = int(parameters.seed) if "seed" in parameters.DESCRIPTOR.fields_by_name else 0
    base = spec_from_ref(request.base, "base") if request.HasField("base") else None
    models = []
    model_settings = []
    for i, model in enumerate(request.models):
        if not model.HasField("checkpoint"):
            raise InvalidArgument(f"models[{i}].checkpoint is required", field=f"models[{i}].checkpoint")
        models.append(spec_from_ref(model.checkpoint, f"models[{i}].checkpoint"))
        own = {}
        for field_name in ("weight", "density"):
            if model.HasField(field_name):
                own[field_name] = spec_from_factor(getattr(model, field_name), f"models[{i}].{field_name}", validate=False)
        model_settings.append(own)
    return _build(request, name, models, base, global_settings, model_settings, switches, seed, out_dtype, leading_slice)


def _config_request(
    request: merge_pb2.StartMergeRequest, config: MethodConfig, roots: tuple[Path, ...], out_dtype: str | None, leading_slice: bool
) -> MergeRequest:
    """A mergekit YAML of any method but slerp as a MergeRequest."""
    models = [model_spec_from_name(n, roots) for n in config.models]
    base = model_spec_from_name(config.base, roots) if config.base else None
    if request.HasField("base"):
        base = spec_from_ref(request.base, "base") if base is None else base
    return _build(
        request, config.method, models, base, dict(config.global_settings), config.model_settings, config.switches, 0,
        out_dtype or config.out_dtype or config.dtype, leading_slice, config.dtype, config.num_layers, field="mergekit_yaml",
    )


def _build(
    request: merge_pb2.StartMergeRequest,
    name: str,
    models: list[CheckpointSpec],
    base: CheckpointSpec | None,
    global_settings: dict[str, InterpolationSpec],
    model_settings: list[dict[str, InterpolationSpec]],
    switches: dict[str, bool],
    seed: int,
    out_dtype: str | None,
    leading_slice: bool,
    compute_cast: str | None = None,
    num_layers: int | None = None,
    field: str = "models",
) -> MergeRequest:
    """Check the models and parameters against the method (INVALID_ARGUMENT naming the field) into a MergeRequest."""
    method = get_method(name)
    check_models(method.name, method.min_models, method.max_models, method.needs_base, models, base, field)
    method_parameters = MethodParameters(global_settings, tuple(model_settings), switches.get("normalize"), switches.get("rescale"), seed)
    t = global_settings.pop("t", None)
    if name == "slerp" and t is None:
        raise InvalidArgument("slerp.t is required", field="slerp.t")
    if t is not None:
        method_parameters = MethodParameters({}, tuple(model_settings))
    inputs = ([base] if method.needs_base and base is not None else []) + models
    settings = MergeSettings(t=t, method=name, method_parameters=method_parameters, model_count=len(models))
    method.check(settings)
    return MergeRequest(
        base=base,
        model_a=inputs[0],
        model_b=inputs[1],
        t=t,
        output_path=request.output_path,
        request_id=request.request_id,
        out_dtype=out_dtype,
        compute_cast=compute_cast,
        num_layers=num_layers,
        max_shard_bytes=request.max_shard_bytes,
        leading_slice=leading_slice,
        overwrite=request.overwrite,
        method=name,
        more_inputs=tuple(inputs[2:]),
        method_parameters=method_parameters,
        model_count=len(models),
    )


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_proto(record: JobRecord) -> merge_pb2.MergeJob:
    """A JobRecord as a MergeJob message."""
    job = merge_pb2.MergeJob(
        job_id=record.job_id,
        request_id=record.request_id,
        state=_STATE_TO_PROTO[record.state],
        progress=merge_pb2.MergeProgress(
            tensors_done=record.tensors_done,
            tensors_total=record.tensors_total,
            bytes_done=record.bytes_done,
            bytes_total=record.bytes_total,
            eta_seconds=record.eta_seconds,
        ),
        output_path=record.output_dir,
        model_a=ref_from_spec(record.request.model_a),
        model_b=ref_from_spec(record.request.model_b),
        method=record.request.method,
        models=[ref_from_spec(m) for m in record.request.models],
    )
    if record.request.t is not None:
        job.t.CopyFrom(factor_from_spec(record.request.t))
    if record.request.base is not None:
        job.base.CopyFrom(ref_from_spec(record.request.base))
    if record.error is not None:
        job.error.CopyFrom(common_pb2.ErrorStatus(code=record.error.code, message=record.error.message, reason=record.error.reason))
    for name in ("create_time", "start_time", "end_time"):
        stamp = _timestamp(getattr(record, name))
        if stamp is not None:
            getattr(job, name).CopyFrom(stamp)
    return job
