"""CTC speech recognition on top of the encoder: character vocabulary, head, loss, greedy decoding.

Vocabulary (fairseq's letter dictionary `dict.ltr.txt`, as Hugging Face's Wav2Vec2CTCTokenizer lays it out
for converted wav2vec 2.0 / data2vec checkpoints):

    0 <pad>   the CTC blank (HF's Data2VecAudioForCTC uses pad_token_id as the blank)
    1 <s>  2 </s>  3 <unk>
    4 |       word boundary: "CAT SAT" -> C A T | S A T
    5..       the characters of the training transcripts, sorted

Transcripts are upper-cased and whitespace-normalised (LibriSpeech style). fairseq's `ltr` labels also end
every utterance with a `|`; HF's tokenizer does not, and neither do we (the trailing boundary carries no
information and decodes to nothing).

Decoding is greedy (best path): argmax per frame, collapse repeats, drop blanks. Beam search is not
provided: the CTC beam decoders on PyPI either pin numpy < 2 (pyctcdecode 0.5) or need a torchaudio build
matching torch plus flashlight-text (torchaudio's ctc_decoder); greedy is also what fairseq's `viterbi`
decoder does without a language model.

Head: dropout (fairseq `final_dropout`) + Linear over the encoder's final states, Xavier-uniform weight and
zero bias (fairseq wav2vec2_asr `Linear`). Loss: `F.ctc_loss` summed over utterances, divided by the
number of utterances (fairseq `sentence_avg: true`), with `zero_infinity` (the reference criterion's
setting, so an utterance too long for its frames does not poison the batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
BLANK, UNK = 0, 3
WORD = "|"


def normalize_text(text: str) -> str:
    """Upper case, single spaces, no leading/trailing space (LibriSpeech transcript style)."""
    return " ".join(text.upper().split())


@dataclass(frozen=True)
class CharVocab:
    """index -> symbol; index 0 is the CTC blank."""

    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.symbols[: len(SPECIALS) + 1] != (*SPECIALS, WORD):
            raise ValueError(f"a CTC vocabulary starts with {(*SPECIALS, WORD)}, got {self.symbols[:5]}")
        bad = [s for s in self.symbols[len(SPECIALS) + 1:] if len(s) != 1 or s.isspace() or s == WORD]
        if bad or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"vocabulary characters must be distinct single non-space characters: {bad}")

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharVocab":
        chars = sorted({c for t in texts for c in normalize_text(t) if c != " "} - {WORD})
        return cls((*SPECIALS, WORD, *chars))

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.symbols)}

    def encode(self, text: str) -> list[int]:
        """'cat sat' -> ids of C A T | S A T; characters not in the vocabulary -> <unk>."""
        idx = self.index
        return [idx.get(c, UNK) for c in normalize_text(text).replace(" ", WORD)]

    def decode(self, ids: Iterable[int]) -> str:
        """ids (already collapsed, no blanks) -> text; `|` -> space, specials dropped."""
        out = "".join(self.symbols[i] for i in ids if i >= len(SPECIALS))
        return " ".join(w for w in out.split(WORD) if w)

    def to_json(self) -> dict:
        return {"symbols": list(self.symbols), "blank": BLANK, "word_delimiter": WORD}

    @classmethod
    def from_json(cls, data: dict) -> "CharVocab":
        return cls(tuple(data["symbols"]))

    def hf_vocab(self) -> dict[str, int]:
        """HF Wav2Vec2CTCTokenizer vocab.json: symbol -> id."""
        return self.index


class CtcHead(nn.Module):
    """(B, T, D) encoder states -> (B, T, V) CTC logits."""

    def __init__(self, dim: int, vocab_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(x))


def frame_lengths(padding_mask: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor:
    """(B,) number of valid frames from a (B, T) padding mask (True = padded), or T each."""
    if padding_mask is None:
        return torch.full((batch,), frames, dtype=torch.long)
    return (~padding_mask).sum(-1).long().cpu()


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean over utterances of -log p(target | frames) under CTC; blank = 0.

    logits: (B, T, V); lengths: (B,) valid frames; targets: B label sequences (no blanks).
    """
    if any(len(t) == 0 for t in targets):
        raise ValueError("CTC targets must not be empty (an utterance has an empty transcript)")
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V), fp32 as fairseq
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    tlen = torch.tensor([len(t) for t in targets], dtype=torch.long)
    # cudnn's CTC needs int32 CPU targets; the generic kernel accepts these on any device
    loss = F.ctc_loss(log_probs, flat.to(logits.device), lengths.to(logits.device), tlen.to(logits.device),
                      blank=BLANK, reduction="sum", zero_infinity=True)
    return loss / len(targets)


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks -> one id list per utterance.

    logits: (B, T, V); lengths: (B,) valid frames (default all T).
    """
    best = logits.argmax(-1).cpu()  # (B, T)
    out = []
    for b in range(best.shape[0]):
        path = best[b, : int(lengths[b])] if lengths is not None else best[b]
        ids = torch.unique_consecutive(path)
        out.append([int(i) for i in ids if i != BLANK])
    return out


def hf_processor_files(vocab: CharVocab, normalize: bool, sample_rate: int = 16_000) -> dict[str, str]:
    """The files of a HF Wav2Vec2Processor (Wav2Vec2CTCTokenizer + Wav2Vec2FeatureExtractor) for `vocab`.

    normalize: the encoder's input normalisation (zero mean, unit variance per utterance), which HF's
    feature extractor does with `do_normalize`. The attention mask is returned because d2v models take a
    padding mask (data2vec speech models were trained with one).
    """
    specials = dict(pad_token=SPECIALS[BLANK], bos_token=SPECIALS[1], eos_token=SPECIALS[2], unk_token=SPECIALS[UNK])
    tokenizer = dict(specials, tokenizer_class="Wav2Vec2CTCTokenizer", word_delimiter_token=WORD,
                     do_lower_case=False, replace_word_delimiter_char=" ", processor_class="Wav2Vec2Processor")
    features = dict(feature_extractor_type="Wav2Vec2FeatureExtractor", feature_size=1, sampling_rate=sample_rate,
                    padding_value=0.0, padding_side="right", do_normalize=normalize, return_attention_mask=True,
                    processor_class="Wav2Vec2Processor")
    files = {"vocab.json": vocab.hf_vocab(), "tokenizer_config.json": tokenizer,
             "special_tokens_map.json": specials, "preprocessor_config.json": features}
    return {name: json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n" for name, data in files.items()}
