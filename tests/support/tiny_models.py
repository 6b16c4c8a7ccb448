"""Tiny random models and tokenizers shared by the test suite (and by non-pytest code).

Why a plain module and not only fixtures: the service end-to-end tests and benches need
the same toy models outside pytest. Everything is seeded, so two calls give identical
weights. Sizes follow tests/conftest.py's contract:

- BERT: hidden 32, 2 layers, 4 heads (head_dim 8), intermediate 64, vocab 100, 3 labels.
- Llama: hidden 48, 2 layers, 6 query heads, 2 KV heads (GQA, 3 q heads per group),
  head_dim 8, intermediate 64, vocab 100, RoPE, tied embeddings (like SmolLM2).

`build_tiny(model_type)` builds the same sizes for every model type of the family table
(core.families): encoders as sequence classifiers (3 labels), decoders as causal LMs.
Type-specific parts are switched on so a test can see them: ELECTRA's embedding
projection (embedding_size 16), Qwen2's attention biases, a sliding window of 8 tokens
(Mistral on every layer, Qwen2/Qwen3 on layer 1 only), and Qwen3's q/k norms with random
weights (HF initialises them to ones, which would hide a wrong dim).

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


_ENCODER_SIZES = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.2,
    "num_labels": len(BERT_LABELS),
    "id2label": dict(enumerate(BERT_LABELS)),
    "label2id": {n: i for i, n in enumerate(BERT_LABELS)},
}
SLIDING_WINDOW = 8


def _decoder_kwargs() -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
    }


def _tiny_config(model_type: str):
    import transformers as tf

    if model_type == "bert":
        return bert_config()
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        cls = {
            "roberta": tf.RobertaConfig,
            "xlm-roberta": tf.XLMRobertaConfig,
            "camembert": tf.CamembertConfig,
        }[model_type]
        # RoBERTa numbers positions from pad_token_id + 1: room for 64 tokens + 2
        return cls(**{**_ENCODER_SIZES, "max_position_embeddings": 66}, type_vocab_size=1,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip
    if model_type == "electra":
        return tf.ElectraConfig(**_ENCODER_SIZES, embedding_size=16, type_vocab_size=2,
                                pad_token_id=0)  # fmt: skip
    if model_type == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            seq_classif_dropout=0.0, initializer_range=0.2, pad_token_id=0,
            num_labels=len(BERT_LABELS), id2label=dict(enumerate(BERT_LABELS)),
            label2id={n: i for i, n in enumerate(BERT_LABELS)},
        )  # fmt: skip
    if model_type == "llama":
        return llama_config()
    kw = _decoder_kwargs()
    if model_type == "mistral":
        return tf.MistralConfig(**kw, sliding_window=SLIDING_WINDOW, rope_theta=10000.0)
    window = {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW,
              "max_window_layers": 1}  # fmt: skip
    if model_type == "qwen2":
        return tf.Qwen2Config(**kw, **window)
    if model_type == "qwen3":
        return tf.Qwen3Config(**kw, **window)
    raise ValueError(f"no tiny config for model_type {model_type!r}")


def build_tiny(model_type: str, seed: int = 0):
    """A seeded tiny model of ``model_type`` in eval mode: encoders are sequence
    classifiers, decoders causal LMs (see the module docstring for sizes)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from core.families import ENCODER, require

    cfg = _tiny_config(model_type)
    torch.manual_seed(seed)
    if require(model_type).family == ENCODER:
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=gen))
    return model.eval()


def save_tiny(model_type: str, directory: str | Path, seed: int = 0) -> Path:
    """A loadable HF folder (safetensors + config + tokenizer) for ``build_tiny``."""
    from core.families import ENCODER, require

    directory = Path(directory)
    model = build_tiny(model_type, seed)
    model.save_pretrained(directory, safe_serialization=True)
    if require(model_type).family == ENCODER:
        tok = build_bert_tokenizer(directory, token_types=model_type != "distilbert")
    else:
        tok = build_llama_tokenizer()
    tok.save_pretrained(directory)
    return directory


def build_bert_tokenizer(directory: str | Path, token_types: bool = True):
    """A WordPiece BertTokenizerFast whose vocab fits in VOCAB_SIZE ids (``token_types``
    False: no token_type_ids, as DistilBERT's tokenizer)."""
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
    names = ["input_ids", "token_type_ids", "attention_mask"]
    tok = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=64,
        model_input_names=names if token_types else [names[0], names[2]],
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
