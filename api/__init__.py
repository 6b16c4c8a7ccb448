"""FineGates service: OpenAI-shaped files / fine-tuning jobs / models API and persistence.

Entry points: ``api.app.create_app(settings)`` (the ASGI app factory) and ``api.cli``.
Nothing here builds settings, engines or apps at import time.
"""
