"""FineGates engine: learned row/column gates that adapt and compress a transformer.

This package must stay importable without the service stack (api/, worker/,
fastapi, celery, sqlalchemy); tests/project/test_core_imports.py checks that.
"""

__version__ = "0.1.0"
ENGINE_VERSION = __version__
