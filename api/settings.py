"""Service settings, read from the environment (prefix ``FINEGATES_``).

Why one class and a cached ``get_settings()``: the API, the worker, the CLI and the
Alembic env all need the same values; building them at import time would freeze the
environment before tests (or ``finegates serve --data-dir``) can change it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets that appear in docs, compose files and tutorials. Production refuses them.
KNOWN_DEFAULT_SECRETS = frozenset(
    {"", "change-me", "changeme", "secret", "password", "postgres", "finegates", "dev", "test"}
)


class Settings(BaseSettings):
    """Every knob of the service. See docs/service.md for what production requires."""

    model_config = SettingsConfigDict(env_prefix="FINEGATES_", extra="ignore")

    mode: Literal["embedded", "production"] = "embedded"
    data_dir: Path = Path(".data")
    # None means "derive from data_dir" (SQLite file / filesystem broker folders).
    database_url: str | None = None
    broker_url: str | None = None
    # Used to sign webhooks and anything else the service signs; production needs a real one.
    secret_key: str | None = None

    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0)
    allow_hub: bool = False
    default_queue: Literal["cpu", "gpu"] = "cpu"
    max_active_jobs_per_tenant: int = Field(100, gt=0)
    job_max_attempts: int = Field(3, ge=1)  # claims per job before the reaper fails it
    heartbeat_timeout_s: float = Field(300.0, gt=0)
    max_job_seconds: int = Field(24 * 3600, gt=0)

    # Database pool (ignored for SQLite, which uses one connection per thread).
    db_pool_size: int = Field(20, ge=1)
    db_max_overflow: int = Field(30, ge=0)
    db_pool_timeout_s: float = Field(10.0, gt=0)
    db_echo: bool = False
    # A liveness ping on every pool checkout: one extra round trip per request, and no 500s
    # from stale pooled connections after a database restart (on by default).
    db_pool_pre_ping: bool = True
    # Successful API-key lookups are cached this long (revocation takes effect after it).
    auth_cache_seconds: float = Field(5.0, ge=0)
    # Threads for sync route handlers; polling clients each hold one while they wait.
    api_threads: int = Field(100, ge=1)
    # Faults (issue 13). The workers' queue sweep re-publishes a queued job whose message
    # may be lost after this long (and after half its wait), and fails a job whose publish
    # has failed for queue_give_up_s.
    queue_republish_after_s: float = Field(120.0, gt=0)
    queue_give_up_s: float = Field(3600.0, gt=0)
    # The worker's watchdog: a job whose training thread made no progress this long is
    # taken from it (requeued, or failed job_stalled at the attempt limit) and the worker
    # process restarts; a cancel or time limit the thread ignores for stop_grace_s, too.
    progress_timeout_s: float = Field(900.0, gt=0)
    stop_grace_s: float = Field(60.0, gt=0)

    # --- limits and abuse (api/limits.py, docs/service.md "Limits") -----------------------
    # JSON request bodies (uploads keep max_upload_bytes); larger bodies answer 413 unread.
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # All request headers together; more answers 431.
    max_header_bytes: int = Field(32 * 1024, gt=0)
    # Requests per minute per tenant (0: no limit); shared through rate_limit_storage_url.
    rate_limit_per_minute: int = Field(6000, ge=0)
    # A `limits` storage URL. None: the broker when it is Redis, else in-process memory.
    rate_limit_storage_url: str | None = None
    max_concurrent_inference_per_tenant: int = Field(16, ge=1)
    max_storage_bytes_per_tenant: int = Field(20 * 1024**3, gt=0)
    max_files_per_tenant: int = Field(1000, gt=0)
    # Threads for CPU-bound request work (tokenizing, chat templates) off the event loop.
    cpu_threads: int = Field(4, ge=1)
    # Hyperparameter caps that keep one job inside a worker's memory (see docs/service.md).
    max_batch_size: int = Field(256, ge=1)
    max_tokens_per_batch: int = Field(16384, ge=1)
    # Run directories of finished jobs (and artifacts of cancelled ones) are deleted after
    # this many hours by `finegates cleanup` and the worker's sweep (0: keep forever).
    run_retention_hours: float = Field(72.0, ge=0)
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(6, ge=1)
    webhook_timeout_s: float = Field(10.0, gt=0)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'finegates.db'}"

    @property
    def storage_dir(self) -> Path:
        return self.data_path / "storage"

    @property
    def runs_dir(self) -> Path:
        return self.data_path / "runs"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @model_validator(mode="after")
    def _production_refuses_defaults(self) -> Settings:
        if self.mode != "production":
            return self
        problems: list[str] = []
        if not self.database_url or self.database_url.startswith("sqlite"):
            problems.append(
                "FINEGATES_DATABASE_URL must point at PostgreSQL "
                "(postgresql+psycopg://user:password@host/db); SQLite is for the embedded mode"
            )
        else:
            password = urlsplit(self.database_url).password or ""
            if password.lower() in KNOWN_DEFAULT_SECRETS:
                problems.append(
                    "the database password in FINEGATES_DATABASE_URL is empty or a well-known "
                    "default; set a real one"
                )
        if not self.broker_url:
            problems.append("FINEGATES_BROKER_URL must be set (e.g. redis://redis:6379/0)")
        key = self.secret_key or ""
        if key.lower() in KNOWN_DEFAULT_SECRETS or len(key) < 32:
            problems.append(
                "FINEGATES_SECRET_KEY must be set to a random value of at least 32 characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if problems:
            raise ValueError("production mode refuses this configuration: " + "; ".join(problems))
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` or pass their own."""
    return Settings()  # type: ignore[call-arg]  # values come from the environment
