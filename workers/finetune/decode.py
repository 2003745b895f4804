"""CTC beam search with Flashlight's lexicon-free decoder (PyPI `flashlight-text`, the C++ decoder that
torchaudio's `ctc_decoder` wraps; it installs on its own, with no torch or numpy pins).

Why not the alternatives: torchaudio has no build for our torch (PyPI's newest torchaudio is older than our
torch and is the CUDA build: `_torchaudio.so` needs libc10_cuda.so), and pyctcdecode 0.5 declares
numpy < 2, so installing it with its dependencies would downgrade numpy.

Search: no language model (flashlight's ZeroLM, lm_weight 0), beam over every token, `log_add` on: the
scores of the frame paths that collapse to the same prefix are summed (log-sum-exp), so with a wide
enough beam the result is the most probable labelling, argmax_y p(y | x) under CTC; greedy decoding is
the single most probable frame path, which can differ (two frames of p(blank) = .6, p(A) = .4: greedy
says "", while p("A") = .64 > p("") = .36).
"""

from __future__ import annotations

import itertools

import torch

from model.ctc import BLANK, WORD, CharVocab


def beam_decode(logits: torch.Tensor, lengths: torch.Tensor | None, vocab: CharVocab,
                beam_size: int = 16, beam_threshold: float = 50.0) -> list[list[int]]:
    """Best labelling per utterance -> one id list each (repeats collapsed, blanks dropped, as greedy_decode).

    logits: (B, T, V); lengths: (B,) valid frames (default all T).
    """
    from flashlight.lib.text.decoder import (CriterionType, LexiconFreeDecoder, LexiconFreeDecoderOptions,
                                             ZeroLM)

    b, t, v = logits.shape
    opts = LexiconFreeDecoderOptions(beam_size=beam_size, beam_size_token=v, beam_threshold=beam_threshold,
                                     lm_weight=0.0, sil_score=0.0, log_add=True, criterion_type=CriterionType.CTC)
    decoder = LexiconFreeDecoder(opts, ZeroLM(), vocab.index[WORD], BLANK, [])
    # the decoder reads raw float32 memory: a contiguous CPU copy that lives until it returns
    emissions = torch.log_softmax(logits.detach().float(), -1).cpu().contiguous()  # (B, T, V)
    out = []
    for i in range(b):
        n = int(lengths[i]) if lengths is not None else t
        ptr = emissions.data_ptr() + emissions.element_size() * i * emissions.stride(0)
        best = list(decoder.decode(ptr, n, v)[0].tokens)[1:-1]  # (n,) frame path; [0], [-1]: start/end sentinels
        out.append([k for k, _ in itertools.groupby(best) if k != BLANK and k >= 0])
    return out
