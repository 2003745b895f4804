"""`--task asr`: speech recognition by CTC fine-tuning of an audio encoder (the paper's LibriSpeech WER setup).

Data: LibriSpeech layout, `<split>/<spk>/<ch>/<spk>-<ch>-<utt>.{flac,wav}` + `<spk>-<ch>.trans.txt`
(`<utt id> TRANSCRIPT` per line). `--data` is a train split whose sibling `test` (or `test-clean`) is the
test split, e.g. `data/demo-audio-asr/train-10min` (`d2v demo-data audio-asr`), or a directory holding
exactly one `train*` split and a test split.

Recipe: fairseq's wav2vec 2.0 CTC fine-tuning configs (examples/wav2vec/config/finetuning/base_10m.yaml,
base_1h.yaml), which data2vec's speech fine-tuning uses unchanged; `AsrRecipe` documents each value and
the deviations of the tiny CPU preset. The pieces that are the task's, not the loop's:
- the conv feature extractor never trains (`feature_grad_mult: 0.0`); since it is frozen and deterministic,
  its outputs are computed once per utterance and cached for the encoder object (`_conv_features`);
- the rest of the encoder is frozen for the first `freeze` fraction of the updates (fairseq
  `freeze_finetune_updates`): only the CTC head learns meanwhile (fairseq runs the whole wav2vec model under
  no_grad then). The task learns the number of updates from the loop's first training `batches` call
  (`--set updates=`, else epochs x batches per epoch), so the fraction holds for any split and budget;
- time masking with the mask embedding (mask_prob .65, spans of 10, at least 2 spans) and channel masking
  (mask_channel_prob, spans of mask_channel_length features set to 0, per utterance), in training only.
WER and CER: jiwer over the whole test set (edits / reference words or characters), greedy decoding.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from model.config import Config
from model.ctc import CharVocab, CtcHead, ctc_loss, frame_lengths, greedy_decode, normalize_text
from model.encoder import Encoder
from model.frontends import audio_frames
from model.masking import span_mask_batch

from . import FinetuneError, Recipe

AUDIO_EXT = (".flac", ".wav")
DEMO_DIR = "demo-audio-asr"


@dataclass(frozen=True)
class AsrRecipe:
    """The CTC-specific part of the fine-tuning recipe (the optimiser and schedule are `recipe`'s Recipe).

    Reference (fairseq base_10m / base_1h): Adam lr 5e-5, betas (.9, .98), tri-stage 10% / 40% / 50% from
    lr * .01 to lr * .05, 13k updates of ~1,600 s of audio each, encoder frozen for the first 10k,
    mask_prob .65 / length 10, mask_channel_prob .25 / length 64 (of 768 features), layerdrop .1,
    activation dropout .1, final dropout 0.
    Tiny CPU preset (audio-tiny encoder, 64 features), deviations and why:
    - 8 utterances (~16 s) per update and ~1.5k updates instead of 13k x 1,600 s: CPU minutes;
    - lr 2e-3 instead of 5e-5: a 4 x 64 trunk with a fresh head at a 100x smaller batch; 5e-5 barely moves
      it in 1.5k updates;
    - encoder frozen for 25% of the updates instead of 77%: with ~10x fewer updates the head is fitted quickly,
      and the unfrozen encoder needs most of the short budget to adapt;
    - channel spans of 64 * 64 / 768 ~ 5 features (the reference's 64 is the whole tiny feature vector);
    - layerdrop and activation dropout: the encoder's own settings (tiny preset: 0), not .1.
    """

    updates: int = 1500  # the default Recipe.updates (`--set updates=`), equal for every label budget
    freeze: float = 0.25  # fraction of the updates with the encoder (all but the head) frozen
    mask_prob: float = 0.65  # time masking: fraction of frames that start a span (fairseq mask_prob)
    mask_length: int = 10  # frames per time span
    mask_min_spans: int = 2  # fairseq wav2vec2 apply_mask: min_masks=2
    channel_prob: float = 0.25  # channel masking probability (mask_channel_prob)
    channel_length: int = 5  # features per channel span (reference 64 of 768)
    final_dropout: float = 0.0  # dropout before the CTC projection


@dataclass
class Utterance:
    key: str  # <spk>-<ch>-<utt>
    path: Path
    text: str  # normalised transcript (upper case, single spaces)
    speaker: str
    wave: torch.Tensor | None = None  # (S,) float32, normalised as the encoder expects; set by `load`


# ------------------------------------------------------------------------------------------ data
def read_split(split: Path) -> list[Utterance]:
    """All utterances of a LibriSpeech-layout split, sorted by key; errors name the file and line."""
    split = Path(split)
    if not split.is_dir():
        raise FinetuneError(f"{split}: no such split directory (LibriSpeech layout <spk>/<ch>/*.trans.txt)")
    out: list[Utterance] = []
    for trans in sorted(split.rglob("*.trans.txt")):
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key, _, text = line.strip().partition(" ")
            if not normalize_text(text):
                raise FinetuneError(f"{trans}:{n}: utterance {key!r} has an empty transcript")
            audio = [trans.parent / f"{key}{ext}" for ext in AUDIO_EXT if (trans.parent / f"{key}{ext}").is_file()]
            if not audio:
                raise FinetuneError(f"{trans}:{n}: no audio file {key}.flac or {key}.wav beside the transcript")
            out.append(Utterance(key, audio[0], normalize_text(text), key.split("-")[0]))
    if not out:
        raise FinetuneError(f"{split}: no *.trans.txt transcripts under it (LibriSpeech layout <spk>/<ch>/)")
    return sorted(out, key=lambda u: u.key)


def find_splits(data: Path) -> tuple[Path, Path]:
    """--data -> (train split, test split): a train split with a `test`/`test-clean` sibling, or a directory
    with exactly one `train*` split and such a test split."""
    data = Path(data).resolve()
    if not data.is_dir():
        raise FinetuneError(f"--data {data}: no such directory; build the demo split with "
                            f"`d2v demo-data audio-asr data/{DEMO_DIR}` or point it at a LibriSpeech train split")
    subdirs = sorted(d.name for d in data.iterdir() if d.is_dir())
    trains = [d for d in subdirs if d.startswith("train")]
    if any(data.glob("*/*/*.trans.txt")):  # data is itself a split
        root, train = data.parent, data
    elif len(trains) == 1:
        root, train = data, data / trains[0]
    else:
        raise FinetuneError(f"--data {data}: expected a LibriSpeech-layout train split or a directory with one "
                            f"train* split; found {trains or subdirs or 'nothing'} (point --data at one of them)")
    for name in ("test", "test-clean"):
        if (root / name).is_dir():
            return train, root / name
    raise FinetuneError(f"{train}: no test split beside it ({root}/test or {root}/test-clean)")


def load_waves(utts: list[Utterance], cfg: Config) -> list[Utterance]:
    from ..preprocess import load_audio, normalize_wave

    for u in utts:
        try:
            wav = load_audio(u.path)
        except Exception as err:  # soundfile / librosa raise many types
            raise FinetuneError(f"{u.path}: cannot be read as audio ({type(err).__name__}: {err})") from None
        if audio_frames(len(wav), cfg.model.frontend.conv_layers) < 1:
            raise FinetuneError(f"{u.path}: {len(wav)} samples is shorter than one frame of the feature extractor")
        u.wave = torch.from_numpy(normalize_wave(wav) if cfg.data.normalize else wav)
    return utts


# ------------------------------------------------------------------------------------------ model pieces
class AsrHead(CtcHead):
    """The CTC head, carrying its vocabulary (saved as head_config.json)."""

    def __init__(self, dim: int, vocab: CharVocab, dropout: float = 0.0) -> None:
        super().__init__(dim, len(vocab), dropout)
        self.vocab = vocab


# Frozen-extractor cache: conv module list -> {utterance key: (T, C) conv output}. Valid because the
# extractor never trains during fine-tuning; weak keys so it dies with the encoder.
_CONV_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _conv_features(enc: Encoder, wave: torch.Tensor, wave_pad: torch.Tensor | None, keys: list[str] | None):
    """(B, S) waves -> (B, T, C) conv-extractor outputs (no grad) and (B, T) frame padding or None."""
    fe = enc.frontend
    n = (~wave_pad).sum(-1).tolist() if wave_pad is not None else [wave.shape[1]] * wave.shape[0]
    frames = [int(audio_frames(s, fe.cfg.conv_layers)) for s in n]
    cache = _CONV_CACHE.setdefault(fe.conv, {}) if keys is not None else {}
    todo = [i for i in range(len(n)) if keys is None or keys[i] not in cache]
    if todo:
        with torch.no_grad():
            x = wave[todo, : max(n[i] for i in todo)][:, None, :]  # (b, 1, S)
            for layer in fe.conv:
                x = layer(x)  # (b, C, T)
        for j, i in enumerate(todo):  # valid frames never see the zero padding (convs are local, LN per frame)
            cache[keys[i] if keys is not None else i] = x[j, :, : frames[i]].T.contiguous()  # (T_i, C)
    feats = [cache[keys[i] if keys is not None else i] for i in range(len(n))]
    t = max(frames)
    out = feats[0].new_zeros(len(feats), t, feats[0].shape[1])  # (B, T, C)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
    pad = torch.arange(t, device=out.device)[None, :] >= torch.tensor(frames, device=out.device)[:, None]
    return out, (pad if pad.any() else None)


def encode(enc: Encoder, batch: dict, asr: AsrRecipe | None, frozen: bool = False):
    """Waves -> (B, T, D) final states and (B, T) frame padding or None; masks only when `asr` is given,
    no gradients into the encoder when `frozen`."""
    fe = enc.frontend
    feats, pad = _conv_features(enc, batch["wave"], batch.get("wave_pad"), batch.get("keys"))
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        x = fe.feature_dropout(fe.proj(fe.proj_norm(feats)))  # (B, T, D)
        if asr is not None:
            x = _mask(enc, x, pad, asr)
        out = enc.context(x, pad).last  # (B, T, D), audio has no prefix
    return out, pad


def _mask(enc: Encoder, x: torch.Tensor, pad: torch.Tensor | None, asr: AsrRecipe) -> torch.Tensor:
    """fairseq wav2vec2 apply_mask: time spans -> mask embedding, then channel spans -> 0."""
    b, t, d = x.shape
    lengths = frame_lengths(pad, b, t).tolist()
    if asr.mask_prob > 0:
        tm = span_mask_batch(lengths, t, asr.mask_prob, asr.mask_length, asr.mask_min_spans)  # (B, T)
        x = enc.apply_mask(x, tm.to(x.device))
    if asr.channel_prob > 0:
        cm = span_mask_batch([d] * b, d, asr.channel_prob, asr.channel_length, 0)  # (B, D)
        x = x.masked_fill(cm.to(x.device)[:, None, :], 0.0)
    return x


def collate(utts: list[Utterance], vocab: CharVocab | None = None) -> dict[str, Any]:
    n = max(len(u.wave) for u in utts)
    wave = torch.zeros(len(utts), n)  # (B, S) right-padded with zeros
    pad = torch.ones(len(utts), n, dtype=torch.bool)
    for i, u in enumerate(utts):
        wave[i, : len(u.wave)] = u.wave
        pad[i, : len(u.wave)] = False
    batch = {"wave": wave, "wave_pad": pad if pad.any() else None, "keys": [str(u.path) for u in utts],
             "texts": [u.text for u in utts]}
    if vocab is not None:
        batch["targets"] = [vocab.encode(u.text) for u in utts]
    return batch


@torch.no_grad()
def transcribe(enc: Encoder, head: AsrHead, batch: dict, beam: int = 0) -> list[str]:
    """Greedy transcripts, or beam search of width `beam` (> 0)."""
    out, pad = encode(enc, batch, None)
    logits = head(out)  # (B, T, V)
    lengths = frame_lengths(pad, *logits.shape[:2])
    if beam > 0:
        from .decode import beam_decode

        ids = beam_decode(logits, lengths, head.vocab, beam)
    else:
        ids = greedy_decode(logits, lengths)
    return [head.vocab.decode(i) for i in ids]


def error_rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer: total edits / total reference words or characters)."""
    import jiwer

    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


# ------------------------------------------------------------------------------------------ the task
class AsrTask:
    name = "asr"
    metric = "wer"
    lower_is_better = True
    ddp_find_unused_parameters = True  # the extractor never gets gradients, the encoder none while frozen

    RECIPES = {
        # See AsrRecipe for the reference values and the deviations. A fixed number of updates (AsrRecipe's
        # budget), whatever the split: the reference also runs 13k updates on its 10 min and 1 h splits.
        "audio": (Recipe(lr=2e-3, epochs=1, batch_size=8, schedule="tri_stage", warmup=0.1, hold=0.4,
                         init_lr_scale=0.01, final_lr_scale=0.05, betas=(0.9, 0.98), updates=AsrRecipe.updates),
                  AsrRecipe()),
    }

    def __init__(self, asr: AsrRecipe | None = None, recipe: Recipe | None = None) -> None:
        self.asr = asr or self.RECIPES["audio"][1]
        self._recipe = recipe or self.RECIPES["audio"][0]
        self._updates = 0  # updates of the fine-tune in progress (set by the first training `batches`)

    def recipe(self, modality: str) -> Recipe:
        if modality not in self.RECIPES:
            raise FinetuneError(f"--task asr needs an audio encoder; this one is {modality}")
        return self._recipe

    def with_recipe(self, modality: str, recipe: Recipe) -> "AsrTask":
        """This task with the job's recipe (after --set overrides): the freeze is a fraction of its updates."""
        self.recipe(modality)
        return AsrTask(self.asr, recipe)

    def freeze_updates(self) -> int:
        return round(self.asr.freeze * self._updates)

    def load(self, data: Path, cfg: Config, tokenizer: Path | None) -> tuple[list, list]:
        if cfg.model.modality != "audio":
            raise FinetuneError(f"--task asr needs an audio encoder; this one is {cfg.model.modality}")
        train, test = find_splits(data)
        return load_waves(read_split(train), cfg), load_waves(read_split(test), cfg)

    def demo_data(self, modality: str, root: Path) -> Path:
        from pipelines.demo_asr import build_asr

        self.recipe(modality)
        build_asr(Path(root) / DEMO_DIR, size="full", skip_existing=True)
        return Path(root) / DEMO_DIR / "train-1h"

    def build_head(self, cfg: Config, train: list) -> nn.Module:
        return AsrHead(cfg.model.trunk.dim, CharVocab.from_texts(u.text for u in train), self.asr.final_dropout)

    def restore_head(self, cfg: Config, head_config: dict[str, Any]) -> nn.Module:
        return AsrHead(cfg.model.trunk.dim, CharVocab.from_json(head_config["vocab"]), head_config.get("dropout", 0.0))

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        return {"vocab": head.vocab.to_json(), "dropout": head.dropout.p}

    def batches(self, examples: list, batch_size: int, *, train: bool,
                rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        # train: shuffled; eval: sorted by length (less padding). Targets are encoded in `loss` by the head's
        # vocabulary, so batches do not depend on it.
        order = rng.permutation(len(examples)) if train else np.argsort([len(u.wave) for u in examples], kind="stable")
        if train:  # the loop's updates (Recipe.length) over this rank's examples
            self._updates = self._recipe.length(math.ceil(len(examples) / batch_size))[1]
        for i in range(0, len(order), batch_size):
            yield collate([examples[int(j)] for j in order[i : i + batch_size]])

    def loss(self, encoder: Encoder, head: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        train = encoder.training
        out, pad = encode(encoder, batch, self.asr if train else None, train and step < self.freeze_updates())
        logits = head(out)  # (B, T, V)
        targets = [head.vocab.encode(t) for t in batch["texts"]]
        return ctc_loss(logits, frame_lengths(pad, *logits.shape[:2]), targets)

    def evaluate(self, encoder: Encoder, head: nn.Module, examples: list) -> dict[str, float]:
        encoder.eval()
        head.eval()
        refs, hyps = [], []
        dev = next(head.parameters()).device
        for batch in self.batches(examples, 16, train=False, rng=np.random.default_rng(0)):
            batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            refs += batch["texts"]
            hyps += transcribe(encoder, head, batch)
        return error_rates(refs, hyps)

    def export_hf(self, ckpt: Path, out_dir: Path) -> Path:
        """`d2v export` of a fine-tuned ASR checkpoint: HF Data2VecAudioForCTC + Wav2Vec2Processor files."""
        from .transcribe import export_asr_hf

        return export_asr_hf(ckpt, out_dir)


TASK = AsrTask()


# ------------------------------------------------------------------------------------------ in-process fit
def fit(encoder: Encoder, cfg: Config, train: list, test: list, updates: int | None = None,
        asr: AsrRecipe | None = None, recipe: Recipe | None = None, seed: int = 0,
        progress=print) -> dict:
    """Fine-tune `encoder` (in place) for about `updates` updates in this process with the fine-tuning loop
    of `d2v finetune` (workers/finetune/loop.py) -> {"wer", "cer", "head", "history", ...}."""
    from ..train import Hooks
    from .loop import fit as loop_fit

    asr = asr or AsrTask.RECIPES["audio"][1]
    base = recipe or AsrTask.RECIPES["audio"][0]
    r = replace(base, updates=updates or asr.updates, seed=seed)
    task = AsrTask(asr, r)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = task.build_head(cfg, train)
    out = loop_fit(task, cfg, encoder, head, train, test, r, Hooks(progress=progress))
    return {**out, "head": head, "updates": r.updates}
