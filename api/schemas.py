"""Request bodies and public response shapes (kept apart from the table models).

Responses follow OpenAI's objects field for field (so the openai SDK parses them) and add
FineGates' own fields next to them, each declared here: response models forbid
undeclared fields, so a route cannot send a key this file does not document (it fails
loudly in the tests instead). Request bodies of the job API forbid unknown fields (a typo
in a hyperparameter block must not be ignored); the inference bodies ignore the OpenAI
fields this server does not use, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaskName = Literal["classification", "causal_lm", "sparsify"]
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- pagination -------------------------------------------------------------------------

Item = TypeVar("Item", bound=BaseModel)


class Page(_Strict, Generic[Item]):
    """OpenAI's list page: ``after`` (the last id of the previous page) + ``limit``."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class CountedPage(Page[Item], Generic[Item]):
    """A page that also says how many objects match the filters, over all pages."""

    count: int


# --- job requests -----------------------------------------------------------------------


class FineGatesMethodConfig(_Strict):
    task: TaskName | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class MethodIn(_Strict):
    type: Literal["finegates"]
    finegates: FineGatesMethodConfig | None = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_SPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def has_control_characters(text: str, allow_space: bool = False) -> bool:
    """NUL and C0/DEL controls (PostgreSQL refuses NUL in text; they break headers and logs).
    ``allow_space``: tab, newline and carriage return are allowed (free text)."""
    return bool((_CONTROL_BUT_SPACE if allow_space else _CONTROL).search(text))


class JobCreate(_Strict):
    """The body of POST /v1/fine_tuning/jobs: OpenAI's, with ``method.type = "finegates"``."""

    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: MethodIn | None = None
    # OpenAI's deprecated top-level form; used only when `method` carries none.
    hyperparameters: dict[str, Any] | None = None

    @field_validator("model", "training_file", "validation_file")
    @classmethod
    def _no_control_characters(cls, v: str | None) -> str | None:
        if v is not None and has_control_characters(v):
            raise ValueError("must not contain control characters or NUL")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 key-value pairs")
        for k, val in v.items():
            if has_control_characters(k) or has_control_characters(val, allow_space=True):
                raise ValueError("keys and values must not contain control characters or NUL")
            if len(k) > 64:
                raise ValueError(f"key '{k[:20]}...' is longer than 64 characters")
            if len(val) > 512:
                raise ValueError(f"value of '{k}' is longer than 512 characters")
        return v


# --- files, jobs, models: responses -----------------------------------------------------


class FileObject(_Strict):
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
    report: dict[str, Any] | None = None  # the validation report (format, task, warnings)


class DeletedObject(_Strict):
    id: str
    object: Literal["file", "model"]
    deleted: bool


class JobError(_Strict):
    code: str
    message: str
    param: str | None = None


class Progress(_Strict):
    step: int
    total_steps: int | None
    percent: float | None
    eta_seconds: int | None
    # while running: training, then pruning, exporting, measuring; null otherwise
    phase: Literal["training", "pruning", "exporting", "measuring"] | None = None


class Sparsity(_Strict):
    target: float | None
    measured: float | None


class FineGatesMethod(_Strict):
    task: str
    hyperparameters: dict[str, Any]


class JobMethod(_Strict):
    type: Literal["finegates"] = "finegates"
    finegates: FineGatesMethod


class JobObject(_Strict):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: JobStatus
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    estimated_finish: int | None
    seed: int
    metadata: dict[str, str] | None
    method: JobMethod
    suffix: str | None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    task: str
    progress: Progress
    sparsity: Sparsity
    compression: dict[str, Any] | None
    queue_position: int | None
    attempts: int
    cancel_requested: bool
    # results (null / empty until the job succeeds): did pruning reach target_sparsity,
    # the delivered model's evaluation, and plain-sentence warnings
    target_reached: bool | None = None
    eval_metrics: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)


class JobEventObject(_Strict):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warning", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointObject(_Strict):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class MetricPoint(_Strict):
    id: str
    object: Literal["fine_tuning.job.metric"] = "fine_tuning.job.metric"
    created_at: int
    kind: Literal["train", "eval"]
    step: int
    loss: float | None
    lr: float | None
    measured_sparsity: float | None
    metrics: dict[str, Any]


class ModelObject(_Strict):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "fine-tuned", "checkpoint"]
    family: str | None = None
    description: str | None = None
    task: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    compression: dict[str, Any] | None = None
    # fine-tuned models and checkpoints: the results the job reported for them
    summary: str | None = None
    target_reached: bool | None = None
    eval_metrics: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    checkpoint_step: int | None = None
    downloads: dict[str, int] | None = None  # bytes: tar (default), safetensors, onnx


class ModelList(_Strict):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# --- inference requests -----------------------------------------------------------------


class ClassifyRequest(_Lenient):
    model: str = Field(min_length=1)
    # TEI's convention: a text, a [text, text_pair], or a batch of [text] / [text, pair]
    input: str | list[str | list[str]]
    truncate: bool = False


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """The text parts of the content; ``developer`` is OpenAI's newer name for system."""
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# --- inference responses ----------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Classification(_Strict):
    object: Literal["classification"] = "classification"
    index: int
    label: str | None  # None for a regression head
    score: float
    scores: dict[str, float]


class ClassifyUsage(_Strict):
    prompt_tokens: int
    total_tokens: int


class ClassificationList(_Strict):
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]
    usage: ClassifyUsage


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Strict):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(_Strict):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Strict):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Strict):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
