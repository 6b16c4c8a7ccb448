"""Tiny random models and tokenizers shared by the test suite (and by non-pytest code).

Why a plain module and not only fixtures: the service end-to-end tests and benches need
the same toy models outside pytest. Everything is seeded, so two calls give identical
weights. Sizes follow tests/conftest.py's contract:

- BERT: hidden 32, 2 layers, 4 heads (head_dim 8), intermediate 64, vocab 100, 3 labels.
- Llama: hidden 48, 2 layers, 6 query heads, 2 KV heads (GQA, 3 q heads per group),
  head_dim 8, intermediate 64, vocab 100, RoPE, tied embeddings (like SmolLM2).

`initializer_range` is raised to 0.2 so activations are large enough that exactness
tests at 1e-4 could actually fail when something is wrong.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

VOCAB_SIZE = 100
BERT_LABELS = ["negative", "neutral", "positive"]

LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_BERT_WORDS = [
    "the", "movie", "film", "good", "bad", "great", "awful", "fine", "plot",
    "actor", "story", "is", "was", "not", "very", "and", "but", "it", "this",
    "boring", "fun", "love", "hate", "okay",
]  # fmt: skip


def bert_config(**overrides):
    from transformers import BertConfig

    kw = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.2,
        "num_labels": len(BERT_LABELS),
        "id2label": dict(enumerate(BERT_LABELS)),
        "label2id": {n: i for i, n in enumerate(BERT_LABELS)},
        "pad_token_id": 0,
    }
    kw.update(overrides)
    return BertConfig(**kw)


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "initializer_range": 0.2,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_bert_cls(seed: int = 0, **config_overrides):
    """A seeded BertForSequenceClassification in eval mode."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(**config_overrides))
    return model.eval()


def build_tiny_llama(seed: int = 0, **config_overrides):
    """A seeded LlamaForCausalLM with GQA (6 q heads / 2 kv heads) in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**config_overrides))
    return model.eval()


def build_bert_tokenizer(directory: str | Path):
    """A WordPiece BertTokenizerFast whose vocab fits in VOCAB_SIZE ids."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-")
    subwords = ["##" + c for c in string.ascii_lowercase]
    vocab = specials + _BERT_WORDS + chars
    vocab += subwords[: VOCAB_SIZE - len(vocab)]
    assert len(vocab) <= VOCAB_SIZE and len(set(vocab)) == len(vocab)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 builds the backend from a dict (a path string is not read as a file)
    tok = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=64
    )
    return tok


def build_llama_tokenizer():
    """A character-level BPE (no merges) with Metaspace, so any ASCII text round-trips.

    Special tokens: <pad>=0, <s>=1, </s>=2, <unk>=3, plus role markers for the chat
    template. Decoding restores spaces (Metaspace decoder).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = (
        ["\u2581"] + list(string.ascii_lowercase) + list(string.ascii_uppercase)
        + list(string.digits) + list(".,!?'-:;()\"") + list("#$%&*+/<=>@[]^_`{|}~")
    )  # fmt: skip
    chars = chars[: VOCAB_SIZE - len(specials)]  # exactly VOCAB_SIZE ids: any id decodes
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) == VOCAB_SIZE
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
        model_max_length=128,
    )
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    return tok


def save_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """Write a loadable HF folder (safetensors + config + tokenizer) for the tiny BERT."""
    directory = Path(directory)
    model = build_tiny_bert_cls(seed)
    model.save_pretrained(directory, safe_serialization=True)
    tok = build_bert_tokenizer(directory)
    tok.save_pretrained(directory)
    return directory


def save_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Write a loadable HF folder (safetensors + config + tokenizer) for the tiny Llama."""
    directory = Path(directory)
    model = build_tiny_llama(seed)
    model.save_pretrained(directory, safe_serialization=True)
    tok = build_llama_tokenizer()
    tok.save_pretrained(directory)
    return directory
