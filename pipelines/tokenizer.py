"""Byte-level BPE tokenizer: training, loading, and the special-token contract shared with the model.

The model's text front end assumes these ids (ordered as listed): <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
Byte-level means every UTF-8 byte is in the base alphabet: nothing is ever <unk>, and decode(encode(t)) == t.
Shard streams are plain ids: each document's tokens followed by </s>; no <s> is inserted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # index == id
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on an iterator of documents (streamed; memory ~ the word counts)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB} "
                         f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise
        special_tokens=list(SPECIAL_TOKENS),  # added first, in order → ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    check_specials(tok, "trained tokenizer")
    return prepare(tok)


def check_specials(tok: Tokenizer, where: str) -> None:
    """Raise ValueError naming `where` unless every special token has its contract id."""
    wrong = [f"{s!r} has id {tok.token_to_id(s)} (expected {i})"
             for i, s in enumerate(SPECIAL_TOKENS) if tok.token_to_id(s) != i]
    if wrong:
        contract = ", ".join(f"{s}={i}" for i, s in enumerate(SPECIAL_TOKENS))
        raise ValueError(f"{where}: " + "; ".join(wrong) + f". d2v text models require {contract}; "
                         "train a tokenizer with these special tokens first, or omit --tokenizer to train one")


def load_tokenizer(source: str, where: str = "tokenizer") -> Tokenizer:
    """A tokenizer from its JSON text, checked against the special-token contract and ready to encode."""
    try:
        tok = Tokenizer.from_str(source)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{where}: not a Hugging Face tokenizers JSON file ({e})") from None
    check_specials(tok, where)
    return prepare(tok)


def prepare(tok: Tokenizer) -> Tokenizer:
    # Literal "<mask>" or "</s>" inside raw text is text, not a control token (this flag is not saved in JSON).
    tok.encode_special_tokens = True
    return tok


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """Documents → one int32 stream: doc tokens then </s>, for each document in order."""
    encs = tok.encode_batch(list(docs), add_special_tokens=False)
    parts = [np.asarray(e.ids + [EOS_ID], dtype=np.int32) for e in encs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
