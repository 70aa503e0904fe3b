"""Small offline Hugging Face building blocks: a word-level tokenizer built from a word list and a tiny random-init
BERT classifier (no download), for tests, examples and ``--quick`` runs. Needs ``pip install metareweight[hf]``.

Example:
    >>> tok = word_tokenizer(["good", "bad"])  # doctest: +SKIP
    >>> tok("good bad")["input_ids"]  # doctest: +SKIP
    [2, 4, 5, 3]
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def require_transformers():
    """Import ``transformers``, or fail with one line naming the package to install."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the hf extra is installed in the test set-up
        raise ImportError("this needs Hugging Face transformers: pip install 'metareweight[hf]'") from None
    return transformers


def word_tokenizer(words: Iterable[str], max_length: int = 64) -> Any:
    """A ``PreTrainedTokenizerFast`` over whitespace-separated ``words`` (lower-cased; unknown words → ``[UNK]``),
    with BERT's ``[CLS] ... [SEP]`` framing and ``[PAD]`` padding, built locally."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length)


def tiny_bert(num_labels: int = 2, vocab_size: int = 100, dropout: float = 0.1, seed: Optional[int] = None,
              **config: Any) -> Any:
    """A random-init ``BertForSequenceClassification`` (hidden 32, 2 layers, 2 heads, intermediate 64) with HF's
    default attention; ``dropout`` sets the hidden and attention dropout."""
    transformers = require_transformers()
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=vocab_size, max_position_embeddings=128, num_labels=num_labels,
                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    settings.update(config)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**settings))


__all__ = ["word_tokenizer", "tiny_bert", "require_transformers", "SPECIAL_TOKENS"]
