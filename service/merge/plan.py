"""The merge plan: every output tensor, how it is made, its dtype, its parameters and its shard, decided before anything is written.

Tensors floating in both models are made by the merge method (`methods`); non-floating ones must
be identical and are copied; a tensor in one model only passes through. Any incompatibility
raises here, so a merge that starts writing has no surprise left in its inputs' headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kinship_service.checkpoints.dtypes import DTYPES, FLOATING, ITEMSIZE
from kinship_service.checkpoints.safetensors_header import TensorInfo
from kinship_service.checkpoints.sources import SINGLE_FILE, Checkpoint
from kinship_service.errors import FailedPrecondition, InvalidArgument
from kinship_service.kinship.similarity import EMBEDDING_NAME, layer_index
from kinship_service.merge.methods import get_method
from kinship_service.merge.parameters import MethodParameters
from kinship_service.merge.slerp import InterpolationSpec

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DTYPE_CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
"""safetensors dtype names as config.json's `torch_dtype` spells them."""

KIND_MERGE = "merge"
"""Made by the merge method from the models' tensors."""
KIND_COPY_A = "copy_a"
"""In the first input only (or not in every input): copied from it."""
KIND_COPY_B = "copy_b"
"""In a later input only: copied from that input (`PlannedTensor.source`)."""
KIND_EQUAL = "equal"
"""Non-floating and identical in every input: copied once all are checked equal."""


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how it is made."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    """Output dtype (safetensors name)."""
    parameters: Mapping[str, float] = field(default_factory=dict)
    """The method's parameters resolved for this tensor (slerp: `t`); empty for copies."""
    sliced: bool = False
    """Built from the common leading slice of differently shaped inputs."""
    source: int = 0
    """The input a copied tensor comes from (0: the first)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in the output."""
        return int(math.prod(self.shape) * ITEMSIZE[self.dtype])

    def parameter(self, name: str) -> float:
        """The resolved value of one of the method's parameters (the plan resolved them all)."""
        return self.parameters[name]


@dataclass(frozen=True)
class MergeSettings:
    """What to merge and how, as resolved by the job layer."""

    t: InterpolationSpec | None = None
    """SLERP's interpolation factor (other methods: None)."""
    out_dtype: str | None = None
    """Output dtype of floating tensors (safetensors name); None keeps the first input's (per tensor)."""
    compute_cast: str | None = None
    """mergekit's `dtype`: round inputs to this dtype before merging (YAML configs only)."""
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    leading_slice: bool = False
    num_layers: int | None = None
    """Layer count for parameter gradients; None reads config.json, else the tensor names."""
    method: str = "slerp"
    """The merge method's name in `methods.METHODS`."""
    method_parameters: MethodParameters = field(default_factory=MethodParameters)
    """Every method's parameter settings but SLERP's t (global and per model), switches and seed."""
    model_count: int = 2
    """Merged models (the base not counted): the runner's inputs are the base, when the method takes one, then these."""

    @property
    def parameters(self) -> dict[str, InterpolationSpec]:
        """The method's global parameters by name, each a mergekit parameter setting (filters, gradients)."""
        given = dict(self.method_parameters.global_settings)
        if self.t is not None:
            given["t"] = self.t
        return given


@dataclass
class MergePlan:
    """The planned output: tensors in file order, their split into shards, and what config.json will say."""

    tensors: list[PlannedTensor]
    shards: list[list[PlannedTensor]]
    num_layers: int
    config_dtype: str
    """The dtype named in the output config.json (`torch_dtype`)."""

    @property
    def total_bytes(self) -> int:
        """Bytes of all output tensors."""
        return sum(t.nbytes for t in self.tensors)

    def shard_names(self) -> list[str]:
        """File names of the shards, as transformers names them."""
        if len(self.shards) == 1:
            return [SINGLE_FILE]
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _order_key(name: str) -> tuple[int, int, str]:
    index = layer_index(name)
    if index is not None:
        return (1, index, name)
    return (0, 0, name) if EMBEDDING_NAME.search(name) else (2, 0, name)


def read_config(checkpoint: Checkpoint) -> dict[str, object] | None:
    """Model A's config.json, or None when it has none (or it is unreadable)."""
    path = checkpoint.directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def count_layers(names: Sequence[str], config: dict[str, object] | None) -> int:
    """The decoder layer count: config.json's `num_hidden_layers` when consistent, else from the names."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    from_names = max(indices) + 1 if indices else 0
    configured = (config or {}).get("num_hidden_layers")
    if isinstance(configured, int) and not isinstance(configured, bool) and configured >= from_names:
        return configured
    return from_names


def _check_dtype(name: str, info: TensorInfo) -> None:
    if info.dtype not in DTYPES:  # F4, F6_*: valid safetensors, but no torch dtype
        raise FailedPrecondition(
            f"tensor {name} has dtype {info.dtype}, which torch cannot hold, so this server cannot copy or merge it; "
            "convert the checkpoint to a byte-sized dtype first",
            reason="UNSUPPORTED_DTYPE",
        )


def _label(index: int, count: int) -> str:
    return ("model A", "model B")[index] if count == 2 else f"input {index}"


def plan_merge(
    infos_a: dict[str, TensorInfo],
    infos_b: dict[str, TensorInfo],
    settings: MergeSettings,
    config_a: dict[str, object] | None,
    more: Sequence[dict[str, TensorInfo]] = (),
) -> MergePlan:
    """Decide every output tensor, its dtype, parameters and shard; raise before anything is written.

    The inputs are A and B, then `more` (the method's order: for task-vector methods the base
    first). Floating tensors in every input are merged by the method (shapes must match unless
    `leading_slice`); non-floating ones must be identical and are copied; a tensor missing from
    some input passes through from the first input that has it.
    """
    method = get_method(settings.method)
    method.check(settings)
    inputs = [infos_a, infos_b, *more]
    count = len(inputs)
    names = sorted(set().union(*inputs), key=_order_key)
    num_layers = settings.num_layers if settings.num_layers is not None else count_layers(names, config_a)
    if settings.num_layers is not None:
        found = count_layers(names, None)
        if found and found != settings.num_layers:
            raise InvalidArgument(
                f"the mergekit layer_range covers {settings.num_layers} layers but the models have {found}; "
                "only full-range merges are supported",
                field="mergekit_yaml",
            )
    planned: list[PlannedTensor] = []
    for name in names:
        present = [infos.get(name) for infos in inputs]
        for info in present:
            if info is not None:
                _check_dtype(name, info)
        found_infos = [info for info in present if info is not None]
        first = found_infos[0]
        if len(found_infos) == count:
            a = first
            for index, other in enumerate(found_infos[1:], start=1):
                if a.is_floating != other.is_floating:
                    raise FailedPrecondition(
                        f"tensor {name} is {a.dtype} in {_label(0, count)} but {other.dtype} in {_label(index, count)}; "
                        "they cannot be merged",
                        reason="DTYPE_MISMATCH",
                    )
                if not a.is_floating and (a.shape != other.shape or a.dtype != other.dtype):
                    raise FailedPrecondition(
                        f"non-floating tensor {name} differs between the models ({a.dtype}{list(a.shape)} vs "
                        f"{other.dtype}{list(other.shape)}); it can only be copied when identical",
                        reason="NON_FLOATING_MISMATCH",
                    )
            if not a.is_floating:
                planned.append(PlannedTensor(name, KIND_EQUAL, a.shape, a.dtype))
                continue
            shape, sliced = a.shape, False
            for index, other in enumerate(found_infos[1:], start=1):
                if other.shape == a.shape:
                    continue
                if not settings.leading_slice or len(a.shape) != len(other.shape):
                    hint = (
                        "; the ranks differ, so no common slice exists"
                        if len(a.shape) != len(other.shape)
                        else "; set shape_mismatch_policy to LEADING_SLICE to merge the common leading slice"
                    )
                    raise FailedPrecondition(
                        f"tensor {name} has shape {list(a.shape)} in {_label(0, count)} but {list(other.shape)} "
                        f"in {_label(index, count)}{hint}",
                        reason="SHAPE_MISMATCH",
                    )
                shape, sliced = tuple(min(x, y) for x, y in zip(shape, other.shape, strict=False)), True
            parameters = method.tensor_parameters(settings, name, num_layers)
            planned.append(PlannedTensor(name, KIND_MERGE, shape, settings.out_dtype or a.dtype, parameters, sliced))
        else:
            source = next(i for i, info in enumerate(present) if info is not None)
            only = first
            dtype = settings.out_dtype if (settings.out_dtype and only.is_floating) else only.dtype
            kind = KIND_COPY_A if source == 0 else KIND_COPY_B
            planned.append(PlannedTensor(name, kind, only.shape, dtype, source=source))
    if not planned:
        raise FailedPrecondition("the models hold no tensors", reason="EMPTY_CHECKPOINT")
    limit = settings.max_shard_bytes if settings.max_shard_bytes > 0 else DEFAULT_MAX_SHARD_BYTES
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in planned:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    floating = [t.dtype for t in planned if t.dtype in FLOATING]
    config_dtype = settings.out_dtype or (max(set(floating), key=floating.count) if floating else "F32")
    return MergePlan(planned, shards, num_layers, config_dtype)
