"""Where the state lives, chosen in one place from `KINSHIP_STATE_URL`.

Without it (the default): the cache in diskcache under `KINSHIP_CACHE_DIR` and the merge jobs in
SQLite next to it, owned by this server; psycopg is then never imported (the `postgres` extra is
optional). With it: fingerprints, pair results, Hub records and merge jobs in PostgreSQL, shared
by every replica; deltas still in this node's diskcache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kinship_service.cache.store import CacheStore
from kinship_service.config import ConfigError, Settings

if TYPE_CHECKING:  # the job modules load the merge machinery; the front process never needs them
    from kinship_service.jobs.manager import MergeJobManager
    from kinship_service.state.database import Database


def shared_database(settings: Settings) -> Database | None:
    """The process's connected, migrated database, or None without KINSHIP_STATE_URL.

    Raises a ConfigError naming the variable when it cannot be used (psycopg missing, database
    unreachable or refusing, schema newer than the code): the server calls this before serving,
    so a wrong URL stops it at start-up.
    """
    if not settings.state_url:
        return None
    try:
        from kinship_service.state.database import open_database
    except ImportError as exc:
        raise ConfigError(
            f"KINSHIP_STATE_URL is set but psycopg is not installed ({exc}); pip install 'model-kinship[postgres]'"
        ) from None
    return open_database(settings.state_url, settings.state_timeout_seconds)


def open_cache_store(settings: Settings) -> CacheStore:
    """The cache store: diskcache alone, or small kinds routed to PostgreSQL (shared_cache.py)."""
    database = shared_database(settings)
    if database is None:
        return CacheStore(settings.cache_dir, settings.cache_size_limit)
    from kinship_service.state.shared_cache import SharedCacheStore

    return SharedCacheStore(settings.cache_dir, settings.cache_size_limit, database)


def open_job_manager(settings: Settings) -> MergeJobManager:
    """The merge-job manager: this server's SQLite registry, or the cluster's PostgreSQL one (jobs/cluster.py)."""
    from kinship_service.jobs.manager import MergeJobManager

    database = shared_database(settings)
    if database is None:
        return MergeJobManager(settings)
    from kinship_service.jobs.cluster import ClusterJobManager

    return ClusterJobManager(settings, database)
