"""The merged model's README.md: its inputs, parameters and the equivalent mergekit configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kinship_service import __version__
from kinship_service.merge.plan import DTYPE_CONFIG_NAMES, KIND_MERGE, MergePlan
from kinship_service.merge.slerp import InterpolationSpec, describe_spec


@dataclass(frozen=True)
class ModelCard:
    """What README.md records about a merge."""

    model_a: str
    model_b: str
    revision_a: str
    revision_b: str
    spec: InterpolationSpec
    job_id: str = ""
    created: float = field(default_factory=time.time)

    def render(self, plan: MergePlan, linear: int, slerped: int) -> str:
        """The README.md text: `linear` and `slerped` count the tensors that took each branch."""
        import yaml

        mergekit = {
            "merge_method": "slerp",
            "base_model": self.model_a,
            "models": [{"model": self.model_a}, {"model": self.model_b}],
            "parameters": {"t": self.spec.to_mergekit()},
            "out_dtype": DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype),
        }
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        front = yaml.safe_dump({"base_model": [self.model_a, self.model_b], "tags": ["merge", "slerp", "model-kinship"]}, sort_keys=False)
        rows = [
            f"| A (t = 0, base) | `{self.model_a}` | {self.revision_a or 'local'} |",
            f"| B (t = 1) | `{self.model_b}` | {self.revision_b or 'local'} |",
        ]
        return "\n".join(
            [
                "---",
                front.rstrip(),
                "---",
                "",
                "# SLERP merge",
                "",
                f"Made by the model-kinship service version {__version__} on {when}"
                + (f" (job `{self.job_id}`)." if self.job_id else "."),
                "",
                "## Inputs",
                "",
                "| model | reference | revision |",
                "| --- | --- | --- |",
                *rows,
                "",
                "## Parameters",
                "",
                f"- t: {describe_spec(self.spec)}",
                f"- layers: {plan.num_layers}; output dtype: {DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype)}",
                f"- tensors: {len(plan.tensors)} ({slerped} spherical, {linear} linear fallback, "
                f"{sum(1 for t in plan.tensors if t.kind != KIND_MERGE)} copied), "
                f"{len(plan.shards)} shard(s), {plan.total_bytes} bytes",
                "",
                "Equivalent mergekit configuration:",
                "",
                "```yaml",
                yaml.safe_dump(mergekit, sort_keys=False).rstrip(),
                "```",
                "",
            ]
        )
