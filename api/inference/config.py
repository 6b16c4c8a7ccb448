"""Inference settings, read from the service Settings when it has them, else the environment.

Kept separate so the standalone ``finegates serve-inference`` process and the embedded API
read the same knobs (env prefix FINEGATES_INFERENCE_...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class InferenceConfig:
    cache_max_bytes: int = 4 * 1024**3  # memory bound of the model LRU
    batching: bool = True  # micro-batch concurrent /v1/classify calls
    max_batch_size: int = 32  # items per model call
    max_wait_ms: float = 5.0  # how long the first item of a batch waits for company
    max_inputs_per_request: int = 256  # cap on /v1/classify input list length
    max_prompts_per_request: int = 16  # cap on /v1/completions prompt list length
    max_tokens_cap: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's completions default
    generation_workers: int = 16  # threads running generation loops
    classifier_backend: str = "auto"  # auto | torch | onnxruntime
    # job: each artifact's serving_precision rule (core.quantize); fp32 | int8: for all
    serving_precision: str = "job"
    batched_decoding: bool = True  # concurrent streams of a FineGates decoder share forwards
    max_decode_batch: int = 32  # streams per shared decoding step

    @classmethod
    def from_settings(cls, settings: Any = None) -> InferenceConfig:
        """Field ``x`` comes from settings.inference_x, else env FINEGATES_INFERENCE_X."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = getattr(settings, f"inference_{f.name}", None) if settings is not None else None
            if raw is None:
                raw = os.environ.get(f"FINEGATES_INFERENCE_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = (
                    raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes", "on"}
                )
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        return cls(**values)
