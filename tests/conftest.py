"""Shared fixtures: tiny random BERT / Llama models and saved model folders.

The builders live in the tests.support package so non-pytest code can import them too:
`from tests.support.tiny_models import build_tiny_llama` from the repository root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.db import db_url, migrated_engine  # noqa: F401 (fixtures)
from tests.support.tiny_models import (
    build_tiny_bert_cls,
    build_tiny_llama,
    save_tiny_bert,
    save_tiny_llama,
)


@pytest.fixture
def tiny_bert_cls():
    """Fresh (mutable) seeded BertForSequenceClassification, eval mode."""
    return build_tiny_bert_cls(seed=0)


@pytest.fixture
def tiny_llama():
    """Fresh (mutable) seeded LlamaForCausalLM with GQA 6/2, head_dim 8, eval mode."""
    return build_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Read-only HF folder (safetensors + WordPiece tokenizer). Do not write into it."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Read-only HF folder (safetensors + char-BPE tokenizer with chat template)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
