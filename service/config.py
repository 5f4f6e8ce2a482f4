"""The server's configuration: every `KINSHIP_*` environment variable, typed, in one place.

`Settings.from_env()` reads and validates them once at start-up; a bad value stops
the server with a message naming the variable, never later in the middle of a request.
The README's configuration table mirrors the fields below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9090

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ConfigError(ValueError):
    """A `KINSHIP_*` variable has a value the server cannot use."""


def parse_bytes(text: str) -> int:
    """Parse a byte size such as `5368709120`, `5GB`, `5G` or `5GiB`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 512MiB, 5GB or a number of bytes)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "model-kinship"


@dataclass(frozen=True)
class Settings:
    """Server settings. Each field is read from `KINSHIP_<FIELD NAME IN UPPER CASE>`."""

    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = DEFAULT_PORT
    """gRPC port; 0 picks a free port (tests)."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Prometheus metrics HTTP port; 0 disables the metrics endpoint."""
    allowed_roots: tuple[Path, ...] = ()
    """Directories local checkpoints may be read from (`:`-separated). Empty: no local paths."""
    device: str = "auto"
    """Torch device for the math: `auto` (CUDA when present, else CPU), `cpu` or `cuda:N`."""
    cpu_kernel: bool = True
    """On CPU, use the fused numba kernel for exact passes (and their fingerprints) when numba is available."""
    mapped_reads: bool = True
    """The fused kernel reads the checkpoints' page-cache pages in place through read-only memory maps
    (SIGBUS-guarded, `checkpoints/mapped.py`); `false`: it copies them with `pread`."""
    cache_dir: Path = field(default_factory=_default_cache_dir)
    """Directory of the fingerprint, delta and pair cache (diskcache)."""
    cache_size_limit: int = 50 * 2**30
    """Cache size limit in bytes (accepts 50GiB etc.); least recently used entries are evicted."""
    output_root: Path = field(default_factory=lambda: _default_cache_dir() / "merges")
    """Merge outputs are written under this directory only."""
    max_merge_jobs: int = 1
    """Merge jobs running at once."""
    max_queued_merge_jobs: int = 16
    """Merge jobs waiting for a worker before StartMerge answers RESOURCE_EXHAUSTED."""
    max_workers: int = 32
    """gRPC handler threads: RPCs executing at once (light calls, callers waiting for heavy work, WatchMergeJob streams)."""
    max_concurrent_rpcs: int = 1024
    """RPCs accepted at once (executing or waiting for a handler thread); beyond it calls get RESOURCE_EXHAUSTED."""
    heavy_workers: int = 1
    """Heavy computations (exact passes, registrations) running at once on the heavy executor; see docs/reliability.md."""
    heavy_queue: int = 8
    """Heavy computations waiting for a heavy worker; beyond it heavy calls get RESOURCE_EXHAUSTED with a retry hint."""
    heavy_process: bool = True
    """`kinship-server` runs heavy work (exact passes, registrations, merge jobs) in a child process, so light
    calls keep a CPU core and the GIL to themselves (docs/reliability.md); false: one process does everything."""
    heavy_scheduling: str = "idle"
    """Scheduling of the heavy-work process's heavy threads: `idle` (SCHED_IDLE, moved to their nice value for a
    while whenever they starve; needs CAP_SYS_NICE, else it falls back to `nice`) or `nice` (nice values only)."""
    ray_address: str = ""
    """A Ray cluster (`host:port` of the head, `ray://host:10001` or `auto`): exact passes and merges run on its
    workers, which read checkpoints and write outputs at the same paths (shared storage). Empty: no Ray (the default)."""
    ray_pass_tasks: int = 0
    """With Ray: tasks (tensor ranges) per exact pass; 0: one per CPU of the cluster."""
    ray_gpus_per_merge: float = 0.0
    """With Ray: GPUs each merge reserves on its worker (Ray's `num_gpus`); 0: a CPU worker."""
    ray_timeout_seconds: float = 3600.0
    """With Ray: the longest wait for a pass's tasks, or for a merge worker to start or answer; then UNAVAILABLE/FAILED."""
    max_message_bytes: int = 16 * 2**20
    """Largest request or response message, in bytes."""
    chunk_bytes: int = 256 * 2**20
    """Working memory for streamed tensor chunks (all checkpoints of one request together)."""
    grace_seconds: float = 20.0
    """On SIGTERM, in-flight RPCs get this long to finish before they are cancelled."""
    drain_seconds: float = 0.0
    """On SIGTERM, health answers NOT_SERVING this long while RPCs are still served, before the grace period."""
    health_port: int = 0
    """Extra plaintext port serving only grpc.health.v1 (Kubernetes probes when TLS is on); 0: none."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "json"
    """`json` (one object per line) or `text`."""
    auth_token: str = ""
    """When set, every RPC but health and reflection needs `authorization: Bearer <token>`."""
    auth_token_file: Path | None = None
    """Read the bearer token from this file instead (Kubernetes secret mount)."""
    tls_cert_file: Path | None = None
    """Server certificate (PEM); with tls_key_file enables TLS."""
    tls_key_file: Path | None = None
    """Server private key (PEM)."""
    tls_client_ca_file: Path | None = None
    """CA bundle (PEM) for client certificates; when set, clients must present one (mutual TLS)."""
    state_url: str = ""
    """`postgresql://user:password@host:port/dbname`: merge jobs, fingerprints, pair results and Hub records live in
    this database, shared by every replica (docs/operations.md); empty: the embedded SQLite and diskcache."""
    state_timeout_seconds: float = 5.0
    """Connecting to the KINSHIP_STATE_URL database gives up after this long (then UNAVAILABLE, or no start-up)."""
    job_lease_seconds: float = 30.0
    """With KINSHIP_STATE_URL: a replica running a merge renews its lease every third of this; a job whose lease
    expired (its replica died) is run again by another replica."""
    job_max_attempts: int = 3
    """With KINSHIP_STATE_URL: a merge whose replicas died this many times ends FAILED (JOB_ATTEMPTS_EXHAUSTED)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `KINSHIP_*` variables; `overrides` (field name: value, tests) win over the environment.

        Each variable is converted by its field's parser (`_convert`); `validate` then checks the values together.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"KINSHIP_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _convert(f.name, raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work together."""
        if not (0 <= self.port <= 65535 and 0 <= self.metrics_port <= 65535):
            raise ConfigError("KINSHIP_PORT and KINSHIP_METRICS_PORT must be in 0..65535")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"KINSHIP_DEVICE={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.heavy_scheduling not in ("idle", "nice"):
            raise ConfigError(f"KINSHIP_HEAVY_SCHEDULING={self.heavy_scheduling!r}: use idle or nice")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"KINSHIP_LOG_FORMAT={self.log_format!r}: use json or text")
        for name in ("max_merge_jobs", "max_workers", "max_concurrent_rpcs", "max_message_bytes", "chunk_bytes", "heavy_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"KINSHIP_{name.upper()} must be at least 1")
        if self.heavy_queue < 0:
            raise ConfigError("KINSHIP_HEAVY_QUEUE must be >= 0")
        if self.max_queued_merge_jobs < 0 or self.grace_seconds < 0:
            raise ConfigError("KINSHIP_MAX_QUEUED_MERGE_JOBS and KINSHIP_GRACE_SECONDS must be >= 0")
        if self.drain_seconds < 0 or not 0 <= self.health_port <= 65535:
            raise ConfigError("KINSHIP_DRAIN_SECONDS must be >= 0 and KINSHIP_HEALTH_PORT in 0..65535")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("set both KINSHIP_TLS_CERT_FILE and KINSHIP_TLS_KEY_FILE, or neither")
        if self.ray_pass_tasks < 0 or self.ray_gpus_per_merge < 0 or self.ray_timeout_seconds <= 0:
            raise ConfigError("KINSHIP_RAY_PASS_TASKS and KINSHIP_RAY_GPUS_PER_MERGE must be >= 0, KINSHIP_RAY_TIMEOUT_SECONDS > 0")
        if self.state_url and not self.state_url.startswith(("postgresql://", "postgres://")):
            scheme = self.state_url.split("://", 1)[0] if "://" in self.state_url else "no scheme"
            raise ConfigError(f"KINSHIP_STATE_URL must be a postgresql://user:password@host:port/dbname URL (got {scheme})")
        if self.state_timeout_seconds <= 0 or self.job_lease_seconds <= 0:
            raise ConfigError("KINSHIP_STATE_TIMEOUT_SECONDS and KINSHIP_JOB_LEASE_SECONDS must be > 0")
        if self.job_max_attempts < 1:
            raise ConfigError("KINSHIP_JOB_MAX_ATTEMPTS must be at least 1")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("KINSHIP_TLS_CLIENT_CA_FILE needs KINSHIP_TLS_CERT_FILE and KINSHIP_TLS_KEY_FILE")


def _parse_bool(raw: str) -> bool:
    """1/0, true/false, yes/no, on/off (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false (1/0, yes/no)")


def _convert(name: str, raw: str) -> int | float | bool | str | Path | tuple[Path, ...]:
    """The value of field `name` from its variable's text; ValueError when it does not parse."""
    if name in ("port", "metrics_port", "max_merge_jobs", "max_queued_merge_jobs", "max_workers", "max_concurrent_rpcs", "heavy_workers", "heavy_queue", "ray_pass_tasks", "job_max_attempts"):
        return int(raw)
    if name in ("cache_size_limit", "max_message_bytes", "chunk_bytes"):
        return parse_bytes(raw)
    if name in ("grace_seconds", "drain_seconds", "ray_gpus_per_merge", "ray_timeout_seconds", "state_timeout_seconds", "job_lease_seconds"):
        return float(raw)
    if name == "health_port":
        return int(raw)
    if name in ("cpu_kernel", "heavy_process", "mapped_reads"):
        return _parse_bool(raw)
    if name == "allowed_roots":
        return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)
    if name in ("cache_dir", "output_root"):
        return Path(raw).expanduser()
    if name.endswith("_file"):
        return Path(raw).expanduser()
    if name == "log_level":
        return raw.upper()
    if name == "heavy_scheduling":
        return raw.strip().lower()
    return raw
