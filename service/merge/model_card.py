"""The merged model's README.md: its inputs, parameters and the equivalent mergekit configuration."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from kinship_service import __version__
from kinship_service.merge.parameters import MethodParameters
from kinship_service.merge.plan import DTYPE_CONFIG_NAMES, KIND_MERGE, MergePlan
from kinship_service.merge.slerp import InterpolationSpec, describe_spec

CARD_FILE = "README.md"
JOB_KEY = "kinship_job"
"""The front-matter key of the job that wrote the output (its job id)."""
_JOB_LINE = re.compile(rf"^{JOB_KEY}: ([0-9A-Za-z_-]{{1,64}})$", re.MULTILINE)


def published_job_id(output_dir: Path) -> str | None:
    """The job id in the front matter of `output_dir`'s model card, or None (no card, or none named).

    Publication renames a complete output into place, so a card naming a job means that job's
    whole output is there. Only the front matter is read (the first 4 KiB), never the tensors.
    """
    try:
        with open(output_dir / CARD_FILE, "rb") as card:
            head = card.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("---\n"):
        return None
    end = head.find("\n---", 3)
    match = _JOB_LINE.search(head[: end if end >= 0 else len(head)])
    return match.group(1) if match else None


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
    method: str = "slerp"
    """Every method but slerp renders from the fields below (model_a/model_b/spec are slerp's)."""
    models: tuple[tuple[str, str], ...] = ()
    """The merged models (reference, revision), in order."""
    base: tuple[str, str] | None = None
    """The base (reference, revision) of a task-vector method."""
    method_parameters: MethodParameters = field(default_factory=MethodParameters)

    def _head(self, front: str, title: str, rows: list[str]) -> list[str]:
        """The card's lines up to the inputs table: front matter, title, provenance, one row per input.

        The front matter names the job (`kinship_job`), so a replica that finds the output
        published after its runner died can tell that this job wrote it (`published_job_id`).
        """
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        job = [f"{JOB_KEY}: {self.job_id}"] if self.job_id else []
        return [
            "---",
            front.rstrip(),
            *job,
            "---",
            "",
            f"# {title} merge",
            "",
            f"Made by the model-kinship service version {__version__} on {when}" + (f" (job `{self.job_id}`)." if self.job_id else "."),
            "",
            "## Inputs",
            "",
            "| model | reference | revision |",
            "| --- | --- | --- |",
            *rows,
        ]

    def render(self, plan: MergePlan, linear: int, slerped: int) -> str:
        """The README.md text: `linear` and `slerped` count the tensors that took each SLERP branch."""
        import yaml

        if self.method != "slerp":
            return self._render_method(plan)

        mergekit = {
            "merge_method": "slerp",
            "base_model": self.model_a,
            "models": [{"model": self.model_a}, {"model": self.model_b}],
            "parameters": {"t": self.spec.to_mergekit()},
            "out_dtype": DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype),
        }
        front = yaml.safe_dump({"base_model": [self.model_a, self.model_b], "tags": ["merge", "slerp", "model-kinship"]}, sort_keys=False)
        rows = [
            f"| A (t = 0, base) | `{self.model_a}` | {self.revision_a or 'local'} |",
            f"| B (t = 1) | `{self.model_b}` | {self.revision_b or 'local'} |",
        ]
        return "\n".join(
            [
                *self._head(front, "SLERP", rows),
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

    def _render_method(self, plan: MergePlan) -> str:
        """The README.md of a merge by any method but slerp: inputs, parameters, the mergekit config."""
        import yaml

        given = self.method_parameters
        models: list[dict[str, object]] = []
        for i, (reference, _) in enumerate(self.models):
            own = given.model_settings[i] if i < len(given.model_settings) else {}
            entry: dict[str, object] = {"model": reference}
            if own:
                entry["parameters"] = {k: v.to_mergekit() for k, v in own.items()}
            models.append(entry)
        shared: dict[str, object] = {k: v.to_mergekit() for k, v in given.global_settings.items()}
        for switch in ("normalize", "rescale"):
            if getattr(given, switch) is not None:
                shared[switch] = getattr(given, switch)
        mergekit: dict[str, object] = {"merge_method": self.method}
        if self.base is not None:
            mergekit["base_model"] = self.base[0]
        mergekit["models"] = models
        if shared:
            mergekit["parameters"] = shared
        mergekit["out_dtype"] = DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype)
        sources = [r for r, _ in self.models] + ([self.base[0]] if self.base else [])
        front = yaml.safe_dump({"base_model": sources, "tags": ["merge", self.method, "model-kinship"]}, sort_keys=False)
        rows = [f"| base | `{self.base[0]}` | {self.base[1] or 'local'} |"] if self.base else []
        rows += [f"| model {i} | `{r}` | {rev or 'local'} |" for i, (r, rev) in enumerate(self.models)]
        seed = [f"- seed of the random masks: {given.seed}"] if self.method.startswith("dare") else []
        return "\n".join(
            [
                *self._head(front, self.method, rows),
                "",
                "## Parameters",
                "",
                *seed,
                f"- layers: {plan.num_layers}; output dtype: {DTYPE_CONFIG_NAMES.get(plan.config_dtype, plan.config_dtype)}",
                f"- tensors: {len(plan.tensors)} ({sum(1 for t in plan.tensors if t.kind == KIND_MERGE)} merged, "
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
