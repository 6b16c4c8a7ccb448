"""Hosted inference: model cache, backends, micro-batching, generation streaming.

The routes live in api.routes.inference; ``api.inference.app.create_inference_app`` builds
the standalone ``finegates serve-inference`` process around the same router.
"""

from .backends import ModelSpec
from .config import InferenceConfig
from .engine import InferenceEngine, StaticResolver

__all__ = ["InferenceConfig", "InferenceEngine", "ModelSpec", "StaticResolver"]
