"""Error types raised by the engine.

core/ raises only these on purpose; api/ maps them to 4xx responses and worker/
maps them to a failed job carrying the message. Every error says what was wrong
and where (field, file, line) so a user can fix their input without reading code.
"""

from __future__ import annotations


class FineGatesError(Exception):
    """Base class. ``code`` is a stable machine-readable identifier."""

    code = "finegates_error"
    user_error = True  # False for internal faults (the API reports those as 500s)

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": None}


class ConfigError(FineGatesError, ValueError):
    """An invalid configuration value. ``field`` names the offending setting."""

    code = "invalid_hyperparameter"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.field}


class DataError(FineGatesError, ValueError):
    """A problem in a dataset file, located by file, 1-based line and field."""

    code = "invalid_training_file"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        where = []
        if file:
            where.append(str(file))
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(f"field '{field}'")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.file = file
        self.line = line
        self.field = field
        self.reason = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.field, "line": self.line}


class ModelNotFoundError(FineGatesError, LookupError):
    code = "model_not_found"


class UnsupportedModelError(FineGatesError, ValueError):
    code = "unsupported_model"


class ArtifactError(FineGatesError, ValueError):
    """A missing, truncated, mismatched or tampered artifact. Never load such weights."""

    code = "invalid_artifact"


class PlanError(FineGatesError, ValueError):
    """A pruning plan that does not fit the model it is applied to."""

    code = "invalid_prune_plan"
    user_error = False


class PruningError(FineGatesError, RuntimeError):
    """Pruning a trained run failed. The run directory is kept: a retry resumes from its
    final state and only prunes again."""

    code = "pruning_failed"
    user_error = False


class TrainingError(FineGatesError, RuntimeError):
    code = "training_failed"
    user_error = False


class RunDirError(FineGatesError, ValueError):
    """A run directory this engine cannot read: written by a newer engine, or not one."""

    code = "invalid_run_dir"
    user_error = False
