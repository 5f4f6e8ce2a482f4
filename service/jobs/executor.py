"""Where a planned merge runs: the seam between the job manager and the machine doing the work.

The manager owns the job's durable record (the job store); an executor only runs one merge to its
published output and reports progress. `LocalMergeExecutor` runs it in this process (today's
behaviour); `kinship_service.distributed.merge.RayMergeExecutor` runs the same `MergeRunner` on a
Ray worker when `KINSHIP_RAY_ADDRESS` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kinship_service.checkpoints.sources import Checkpoint
from kinship_service.config import Settings
from kinship_service.kinship.exact import resolve_device
from kinship_service.merge.model_card import ModelCard
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.runner import MergeRunner, MergeSummary, Progress


@dataclass(frozen=True)
class PlannedMerge:
    """Everything a merge needs to run anywhere that sees the same paths (shared storage)."""

    checkpoint_a: Checkpoint
    checkpoint_b: Checkpoint
    settings: MergeSettings
    chunk_elements: int
    allowed_roots: tuple[Path, ...]
    use_cpu_kernel: bool
    tmp_dir: Path
    final_dir: Path
    overwrite: bool
    card: ModelCard
    more_checkpoints: tuple[Checkpoint, ...] = ()
    """Inputs after the first two (methods of n models), in model order."""
    device: str = "cpu"
    """`KINSHIP_DEVICE` (`auto`, `cpu`, `cuda:N`), resolved where the merge runs (`exact.resolve_device`)."""


class MergeExecutor(Protocol):
    """Runs a planned merge into `tmp_dir` and publishes it to `final_dir` (atomically), or raises."""

    def run(self, merge: PlannedMerge, progress: Callable[[Progress], None], check_cancelled: Callable[[], None]) -> MergeSummary:
        """Raises Cancelled when `check_cancelled` does, KinshipError or OSError when the merge fails."""


def run_planned(merge: PlannedMerge, progress: Callable[[Progress], None], check_cancelled: Callable[[], None]) -> MergeSummary:
    """Run `merge` here with the streaming runner (a failed or cancelled run leaves nothing published)."""
    runner = MergeRunner(
        merge.checkpoint_a,
        merge.checkpoint_b,
        merge.settings,
        more_checkpoints=merge.more_checkpoints,
        chunk_elements=merge.chunk_elements,
        allowed_roots=merge.allowed_roots,
        progress=progress,
        check_cancelled=check_cancelled,
        use_cpu_kernel=merge.use_cpu_kernel,
        device=resolve_device(merge.device),
    )
    return runner.run(merge.tmp_dir, merge.final_dir, overwrite=merge.overwrite, card=merge.card)


class LocalMergeExecutor:
    """Runs merges in this process."""

    def run(self, merge: PlannedMerge, progress: Callable[[Progress], None], check_cancelled: Callable[[], None]) -> MergeSummary:
        return run_planned(merge, progress, check_cancelled)


def default_executor(settings: Settings) -> MergeExecutor:
    """On the Ray cluster when KINSHIP_RAY_ADDRESS is set, else here."""
    if settings.ray_address:
        from kinship_service.distributed.merge import RayMergeExecutor

        return RayMergeExecutor(settings)
    return LocalMergeExecutor()


__all__: Sequence[str] = ("LocalMergeExecutor", "MergeExecutor", "PlannedMerge", "default_executor", "run_planned")
