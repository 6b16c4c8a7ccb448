"""Request bodies and public response shapes (kept apart from the table models).

Responses follow OpenAI's objects field for field (so the openai SDK parses them) and add
FineGates' own fields next to them; ``extra="allow"`` keeps the documents open for that.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaskName = Literal["classification", "causal_lm", "sparsify"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- requests ---------------------------------------------------------------------------


class FineGatesMethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskName | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class MethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["finegates"]
    finegates: FineGatesMethodConfig | None = None


class JobCreate(BaseModel):
    """The body of POST /v1/fine_tuning/jobs (issue 4 contract)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: MethodIn | None = None
    # OpenAI's deprecated top-level form; used only when `method` carries none.
    hyperparameters: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 key-value pairs")
        for k, val in v.items():
            if len(k) > 64:
                raise ValueError(f"key '{k[:20]}...' is longer than 64 characters")
            if len(val) > 512:
                raise ValueError(f"value of '{k}' is longer than 512 characters")
        return v


# --- responses --------------------------------------------------------------------------


class FileObject(_Open):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    format: str | None = None
    task: str | None = None
    n_rows: int | None = None
    sha256: str


class FileList(_Open):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    count: int
    first_id: str | None = None
    last_id: str | None = None


class DeletedObject(_Open):
    id: str
    object: str
    deleted: bool


class JobError(_Open):
    code: str
    message: str
    param: str | None = None


class Progress(_Open):
    step: int
    total_steps: int | None
    percent: float | None
    eta_seconds: int | None


class Sparsity(_Open):
    target: float | None
    measured: float | None


class JobObject(_Open):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    estimated_finish: int | None
    seed: int
    metadata: dict[str, str] | None
    method: dict[str, Any]
    suffix: str | None
    integrations: list[Any] = Field(default_factory=list)
    task: str
    progress: Progress
    sparsity: Sparsity
    compression: dict[str, Any] | None
    queue_position: int | None
    attempts: int
    cancel_requested: bool


class JobList(_Open):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool
    count: int | None = None


class JobEventObject(_Open):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class EventList(_Open):
    object: Literal["list"] = "list"
    data: list[JobEventObject]
    has_more: bool


class CheckpointObject(_Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointList(_Open):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class MetricPoint(_Open):
    id: str
    object: Literal["fine_tuning.job.metric"] = "fine_tuning.job.metric"
    created_at: int
    kind: str
    step: int
    loss: float | None
    lr: float | None
    measured_sparsity: float | None
    metrics: dict[str, Any]


class MetricList(_Open):
    object: Literal["list"] = "list"
    data: list[MetricPoint]
    has_more: bool


class ModelObject(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "fine-tuned"]
    family: str | None = None
    task: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    compression: dict[str, Any] | None = None


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelObject]
