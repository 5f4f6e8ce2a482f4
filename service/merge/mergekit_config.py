"""mergekit configurations: a SLERP YAML config read into the service's structures, and mergekit model names resolved.

The math lives in `slerp`; this module only parses. Anything mergekit can express that the
service does not run (several slices, layer stacking, tokenizer surgery, LoRA references) is
INVALID_ARGUMENT naming the part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kinship_service.checkpoints.sources import CheckpointSpec, HubRepo, LocalPath
from kinship_service.errors import InvalidArgument
from kinship_service.merge.slerp import FactorEntry, InterpolationSpec, validate_spec

_DTYPE_NAMES = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
}


def dtype_name(text: str, field: str) -> str:
    """A dtype spelling (`bfloat16`, `float16`, `float32` and short forms) -> safetensors name."""
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise InvalidArgument(f"{field}: unsupported dtype {text!r}; use bfloat16, float16 or float32", field=field)
    return _DTYPE_NAMES[key]


@dataclass(frozen=True)
class MergekitConfig:
    """What the service takes from a mergekit SLERP configuration."""

    model_a: str
    """`base_model` (t = 0)."""
    model_b: str
    t: InterpolationSpec
    dtype: str | None
    """mergekit's `dtype`: inputs are rounded to it before merging (safetensors name)."""
    out_dtype: str | None
    """mergekit's `out_dtype` (safetensors name)."""
    num_layers: int | None
    """The layer count of the slice (`layer_range` end), when the config gives one."""


def _setting_entries(setting: Any, where: str) -> list[FactorEntry]:
    """mergekit's ParameterSetting for t -> entries (a constant, a gradient, or conditional entries)."""

    def scalar_or_gradient(value: Any, at: str) -> tuple[tuple[float, ...], bool]:
        if isinstance(value, bool):
            raise InvalidArgument(f"{at}: t must be a number or a list of numbers, got {value!r}", field="mergekit_yaml")
        if isinstance(value, (int, float)):
            return (float(value),), False
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value), True
        raise InvalidArgument(f"{at}: t must be a number or a non-empty list of numbers, got {value!r}", field="mergekit_yaml")

    def conditional(item: dict[str, Any], at: str) -> FactorEntry:
        if "value" not in item:
            raise InvalidArgument(f"{at}: a conditional t entry needs `value`", field="mergekit_yaml")
        unknown = set(item) - {"value", "filter"}
        if unknown:
            raise InvalidArgument(f"{at}: unknown keys {sorted(unknown)} in a t entry", field="mergekit_yaml")
        raw_filter = item.get("filter")
        filter_text = "" if raw_filter in (None, "*") else str(raw_filter)
        anchors, gradient = scalar_or_gradient(item["value"], at)
        return FactorEntry(filter_text, anchors, gradient)

    if isinstance(setting, dict):
        return [conditional(setting, where)]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return [conditional(e, f"{where}[{i}]") for i, e in enumerate(setting)]
    anchors, gradient = scalar_or_gradient(setting, where)
    return [FactorEntry("", anchors, gradient)]


def _model_name(value: Any, where: str) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit also accepts {model: ..., lora: ...}
        if value.get("lora"):
            raise InvalidArgument(f"{where}: LoRA references are not supported; merge the adapter first", field="mergekit_yaml")
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{where}: expected a model name, got {value!r}", field="mergekit_yaml")
    if "+" in value:
        raise InvalidArgument(f"{where}: LoRA references (`model+lora`) are not supported", field="mergekit_yaml")
    return value.strip()


MAX_YAML_NODES = 10_000
"""Values a mergekit_yaml document may hold once its aliases are expanded (real configs hold tens)."""


def _check_expanded_size(doc: Any) -> None:
    """INVALID_ARGUMENT for a document that expands to more than MAX_YAML_NODES values.

    YAML aliases let a few hundred bytes stand for billions of values ("billion laughs"), or a
    structure that contains itself; anything that walks, prints or compares such a document
    would never finish. Counting with a bounded walk stops after MAX_YAML_NODES steps.
    """
    stack = [doc]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise InvalidArgument(
                f"mergekit_yaml expands to more than {MAX_YAML_NODES} values (YAML aliases?); send a plain SLERP config",
                reason="YAML_TOO_LARGE",
                field="mergekit_yaml",
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def parse_mergekit_yaml(text: str) -> MergekitConfig:
    """Read a mergekit SLERP configuration (`slices:` or `models:` form) into our structures.

    Supported: `merge_method: slerp`, `base_model`, two models over the same full layer range in a
    single slice (or the `models:` list), `parameters.t` at the top level or on the slice (slice
    entries are tried first, then the top-level ones, as mergekit does), `dtype` and `out_dtype`.
    Anything else mergekit can express (several slices, layer stacking, tokenizer surgery) is
    INVALID_ARGUMENT naming the part.
    """
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidArgument(f"mergekit_yaml is not valid YAML: {str(exc)[:500]}", field="mergekit_yaml") from None
    _check_expanded_size(doc)
    if not isinstance(doc, dict):
        raise InvalidArgument("mergekit_yaml must be a mapping with merge_method, base_model and models or slices", field="mergekit_yaml")
    method = str(doc.get("merge_method", "")).lower()
    if method != "slerp":
        raise InvalidArgument(
            f"mergekit_yaml: merge_method must be slerp, got {doc.get('merge_method')!r}",
            field="mergekit_yaml",
        )
    unsupported = {"tokenizer_source", "tokenizer", "modules", "chat_template"} & {k for k, v in doc.items() if v}
    if unsupported:
        raise InvalidArgument(f"mergekit_yaml: {sorted(unsupported)} are not supported by this service", field="mergekit_yaml")
    if "base_model" not in doc:
        raise InvalidArgument("mergekit_yaml: base_model is required for slerp (it is model A, t = 0)", field="mergekit_yaml")
    base = _model_name(doc["base_model"], "base_model")

    slices, models = doc.get("slices"), doc.get("models")
    if bool(slices) == bool(models):
        raise InvalidArgument("mergekit_yaml: give exactly one of `slices` or `models`", field="mergekit_yaml")
    entries: list[FactorEntry] = []
    num_layers: int | None = None
    if slices:
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise InvalidArgument(
                "mergekit_yaml: exactly one slice is supported (layer stacking across slices is not)", field="mergekit_yaml"
            )
        sources = slices[0].get("sources")
        if not isinstance(sources, list) or not sources:
            raise InvalidArgument("mergekit_yaml: slices[0].sources must list the models", field="mergekit_yaml")
        names = []
        ranges = set()
        for i, source in enumerate(sources):
            if not isinstance(source, dict):
                raise InvalidArgument(f"mergekit_yaml: slices[0].sources[{i}] must be a mapping", field="mergekit_yaml")
            names.append(_model_name(source.get("model"), f"slices[0].sources[{i}].model"))
            layer_range = source.get("layer_range")
            if layer_range is not None:
                if (
                    not isinstance(layer_range, list)
                    or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                ):
                    raise InvalidArgument(f"mergekit_yaml: slices[0].sources[{i}].layer_range must be [start, end]", field="mergekit_yaml")
                ranges.add(tuple(layer_range))
        if len(ranges) > 1:
            raise InvalidArgument("mergekit_yaml: both sources must use the same layer_range", field="mergekit_yaml")
        if ranges:
            start, end = ranges.pop()
            if start != 0 or end <= 0:
                raise InvalidArgument(
                    "mergekit_yaml: only a full layer range [0, num_layers] is supported", field="mergekit_yaml"
                )
            num_layers = end
        slice_params = slices[0].get("parameters") or {}
        if not isinstance(slice_params, dict):
            raise InvalidArgument("mergekit_yaml: slices[0].parameters must be a mapping", field="mergekit_yaml")
        if "t" in slice_params:
            entries += _setting_entries(slice_params["t"], "slices[0].parameters.t")
    else:
        if not isinstance(models, list):
            raise InvalidArgument("mergekit_yaml: models must be a list", field="mergekit_yaml")
        names = [_model_name(m, f"models[{i}]") for i, m in enumerate(models)]
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("mergekit_yaml: parameters must be a mapping", field="mergekit_yaml")
    if "t" in params:
        entries += _setting_entries(params["t"], "parameters.t")
    if not entries:
        raise InvalidArgument("mergekit_yaml: parameters.t is required for slerp", field="mergekit_yaml")

    others = [n for n in dict.fromkeys(names) if n != base]
    if len(others) != 1 or len(set(names) | {base}) != 2:
        raise InvalidArgument(
            f"mergekit_yaml: slerp merges exactly two models, base_model and one other; got {sorted(set(names) | {base})}",
            field="mergekit_yaml",
        )
    spec = validate_spec(InterpolationSpec(tuple(entries)), field="mergekit_yaml")
    dtype = dtype_name(doc["dtype"], "mergekit_yaml.dtype") if doc.get("dtype") else None
    out_dtype = dtype_name(doc["out_dtype"], "mergekit_yaml.out_dtype") if doc.get("out_dtype") else None
    return MergekitConfig(base, others[0], spec, dtype, out_dtype, num_layers)


def model_spec_from_name(name: str, allowed_roots: tuple[Path, ...]) -> CheckpointSpec:
    """A mergekit model name: a local path when it is absolute or exists under an allowed root, else a Hub repo id."""
    if not name or "\x00" in name:
        raise InvalidArgument(f"model name {name!r} in mergekit_yaml is empty or holds a NUL byte", field="mergekit_yaml")
    if name.startswith(("/", "./", "../", "~")):
        return LocalPath(name)
    for root in allowed_roots:
        candidate = Path(os.path.realpath(Path(root) / name))
        # Only look inside the root: existence elsewhere must not be probed through this name.
        if candidate.is_relative_to(os.path.realpath(root)) and os.path.exists(candidate):  # False, not OSError, for names too long
            return LocalPath(str(candidate))
    repo, _, revision = name.partition("@")
    return HubRepo(repo, revision)
