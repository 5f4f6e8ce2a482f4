"""What a request names, resolved to content identities, and whether those identities still hold.

The cache is keyed by identities (`identity.py`): a reference is resolved (confined to
the allowed roots) and identified from its headers and file states. A Hub checkpoint
pinned to a commit that has left the Hub cache is identified from its record
(`hub_records.py`), with no files: only cached data can answer for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from kinship_service.cache.hub_records import HubRecords
from kinship_service.cache.keys import COMMIT
from kinship_service.checkpoints.identity import CheckpointIdentity, IdentityResolver
from kinship_service.checkpoints.sources import (
    Checkpoint,
    CheckpointSpec,
    HubRepo,
    describe,
    resolve,
    resolve_with_stats,
)
from kinship_service.config import Settings
from kinship_service.errors import FailedPrecondition, NotFound

log = logging.getLogger("kinship.registry")

CheckpointLike = Checkpoint | CheckpointSpec
"""A reference to resolve, or a checkpoint resolved already."""


@dataclass
class Resolved:
    """A checkpoint reference resolved to its identity; `checkpoint` is None when only cached data remain."""

    label: str
    checkpoint: Checkpoint | None
    ident: CheckpointIdentity


class Resolver:
    """Resolves and identifies references for the cache (thread-safe)."""

    def __init__(self, settings: Settings, identities: IdentityResolver, hub: HubRecords) -> None:
        self.settings = settings
        self.identities = identities
        self.hub = hub

    def checkpoint(self, item: CheckpointLike, field_name: str) -> Checkpoint:
        """`item` resolved (PermissionDenied outside the allowed roots, NotFound, ...)."""
        if isinstance(item, Checkpoint):
            return item
        return resolve(item, self.settings.allowed_roots, field_name)

    def resolve(self, item: CheckpointLike, field_name: str) -> Resolved:
        """Resolve and identify a reference.

        A Hub checkpoint pinned to a commit hash that is no longer in the Hub cache
        resolves from the record kept when it was last seen (its identity and tensor
        headers), so cached fingerprints, deltas and pair results still answer for it.
        """
        stats: tuple[os.stat_result | None, ...]
        try:
            if isinstance(item, Checkpoint):
                checkpoint, stats = item, ()
            else:  # the stats taken while resolving spare identify() a second stat of each file
                checkpoint, stats = resolve_with_stats(item, self.settings.allowed_roots, field_name)
        except NotFound:
            if isinstance(item, HubRepo) and COMMIT.fullmatch(item.revision or ""):
                ident = self.hub.identity(item.repo_id, item.revision)
                if ident is not None:
                    return Resolved(describe(item), None, ident)
            raise
        ident = self.identities.identify(checkpoint, stats)
        if isinstance(item, HubRepo) and ident.identity.startswith("hub-"):
            self.hub.remember(item.repo_id, checkpoint.revision, ident)
        return Resolved(checkpoint.label, checkpoint, ident)

    @staticmethod
    def files_needed(resolved: Sequence[Resolved], why: str) -> list[Checkpoint]:
        """The checkpoints' files; NotFound (HUB_NOT_FOUND) naming those known only from their records."""
        files = [r.checkpoint for r in resolved if r.checkpoint is not None]
        if len(files) < len(resolved):
            absent = [r.label for r in resolved if r.checkpoint is None]
            raise NotFound(
                f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} no longer in the Hub cache and the cache "
                f"holds no {why}; download {'it' if len(absent) == 1 else 'them'} again (or allow Hub access)",
                reason="HUB_NOT_FOUND",
            )
        return files

    def raise_if_changed(self, checkpoints: Sequence[Checkpoint], idents: Sequence[CheckpointIdentity]) -> None:
        """FAILED_PRECONDITION (CHECKPOINT_CHANGED) naming the checkpoints whose files changed since they were identified."""
        changed = [c.label for c, ident in zip(checkpoints, idents, strict=False) if not self.identities.unchanged(ident)]
        if changed:
            log.warning("a checkpoint changed while it was read", extra={"checkpoints": changed})
            raise FailedPrecondition(
                f"{', '.join(changed)} changed (rewritten or truncated) while {'it was' if len(changed) == 1 else 'they were'} "
                "being read, so the result would mix two versions; retry once the files are completely written",
                reason="CHECKPOINT_CHANGED",
            )

    def unchanged(self, idents: Sequence[CheckpointIdentity]) -> bool:
        """Whether every identity still holds (a warning is logged when not: its results are not cached)."""
        if all(self.identities.unchanged(i) for i in idents):
            return True
        log.warning("a checkpoint changed while it was read; its results are not cached")
        return False
