"""Speech recognition with CTC (issue 12): vocabulary and greedy decoding, CTC loss, WER/CER, the demo ASR
split, a tiny fine-tune that learns, `d2v transcribe`, and the Hugging Face Data2VecAudioForCTC export.

Independent references: hand-worked decodes and edit distances, the CTC probability by enumerating every
frame path (the definition, Graves et al. 2006), transformers' Data2VecAudioForCTC + Wav2Vec2Processor.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.ctc import BLANK, CharVocab, ctc_loss, greedy_decode
from model.encoder import Encoder
from model.presets import get_preset
from tests.conftest import require
from workers.finetune import Recipe
from workers.finetune.asr import TASK, AsrHead, AsrRecipe, AsrTask, Utterance, collate, encode, error_rates, fit, read_split

SR = 16_000


# ------------------------------------------------------------------------------------ vocabulary, decoding
def test_vocab_and_greedy_decode_hand_worked():
    vocab = CharVocab.from_texts(["cat sat", "A  tac"])
    assert vocab.symbols == ("<pad>", "<s>", "</s>", "<unk>", "|", "A", "C", "S", "T")
    assert vocab.encode("Cat  sat") == [6, 5, 8, 4, 7, 5, 8]  # C A T | S A T
    assert vocab.encode("cab") == [6, 5, 3]  # B is not in the vocabulary -> <unk>
    # frame argmaxes: _ C C _ A T T | | _ S A _ T T _ T  -> C A T | S A T T (blank splits the double T)
    path = [0, 6, 6, 0, 5, 8, 8, 4, 4, 0, 7, 5, 0, 8, 8, 0, 8]
    logits = torch.nn.functional.one_hot(torch.tensor([path, path]), len(vocab)).float() * 5  # (2, T, V)
    ids = greedy_decode(logits, torch.tensor([len(path), 12]))  # the second utterance stops after "S A"
    assert ids == [[6, 5, 8, 4, 7, 5, 8, 8], [6, 5, 8, 4, 7, 5]]
    assert [vocab.decode(i) for i in ids] == ["CAT SATT", "CAT SA"]
    assert CharVocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab


# ------------------------------------------------------------------------------------------------- loss
def brute_force_nll(log_probs: torch.Tensor, target: list[int]) -> float:
    """-log sum over all frame paths that collapse (merge repeats, drop blanks) to `target`."""
    T, V = log_probs.shape
    total = 0.0
    for path in itertools.product(range(V), repeat=T):
        collapsed = [k for k, _ in itertools.groupby(path) if k != BLANK]
        if collapsed == target:
            total += math.exp(sum(float(log_probs[t, k]) for t, k in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_matches_the_path_sum_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)  # (B, T, V)
    targets = [[1, 2, 2], [3, 1]]  # the repeated 2 needs a blank between: only some paths count
    lengths = torch.tensor([6, 4])  # the second utterance has 4 valid frames
    lp = torch.log_softmax(logits, -1)
    expected = (brute_force_nll(lp[0], targets[0]) + brute_force_nll(lp[1, :4], targets[1])) / 2
    assert float(ctc_loss(logits, lengths, targets)) == pytest.approx(expected, rel=1e-5)


def test_ctc_loss_of_a_confident_known_alignment_is_near_zero():
    align = [0, 1, 1, 0, 2, 0, 2]  # -> 1 2 2
    logits = torch.nn.functional.one_hot(torch.tensor([align]), 4).float() * 30
    assert float(ctc_loss(logits, torch.tensor([7]), [[1, 2, 2]])) < 1e-6
    assert float(ctc_loss(logits, torch.tensor([7]), [[1, 2]])) > 10  # a different transcript is impossible


def labelling_probs(log_probs: torch.Tensor, symbols: list[int]) -> dict[tuple[int, ...], float]:
    """p(y | x) of every labelling y over `symbols` (the others have probability 0), by summing the
    probability of every frame path that collapses to it (Graves et al. 2006, eq. 3)."""
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(symbols, repeat=log_probs.shape[0]):
        y = tuple(k for k, _ in itertools.groupby(path) if k != BLANK)
        out[y] = out.get(y, 0.0) + math.exp(sum(float(log_probs[t, k]) for t, k in enumerate(path)))
    return out


def test_beam_search_finds_the_labelling_greedy_misses():
    from workers.finetune.decode import beam_decode

    vocab = CharVocab.from_texts(["A"])  # <pad> <s> </s> <unk> | A
    probs = torch.full((1, 2, 6), 1e-6)
    probs[0, :, BLANK], probs[0, :, 5] = 0.6, 0.4  # per frame: blank .6, A .4
    # p("") = .6 * .6 = .36 (the best single path); p("A") = .4*.4 + .4*.6 + .6*.4 = .64
    assert greedy_decode(probs.log()) == [[]] and beam_decode(probs.log(), None, vocab) == [[5]]
    # random emissions over blank, | and A against the exhaustive sums: flashlight's search is approximate
    # (it keeps a labelling ending in blank apart from the same one ending in its last symbol, so their
    # probabilities are not added), yet it finds the most probable labelling more often than greedy does
    g = torch.Generator().manual_seed(0)
    exact = {"beam": 0, "greedy": 0}
    for _ in range(12):
        logits = torch.randn(2, 8, 6, generator=g) * 1.5  # (B, T, V)
        logits[:, :, 1:4] = -math.inf  # <s> </s> <unk> never emitted: keeps the enumeration small
        lengths = torch.tensor([8, 6])
        found = {"beam": beam_decode(logits, lengths, vocab, 64), "greedy": greedy_decode(logits, lengths)}
        for b in range(2):
            p = labelling_probs(torch.log_softmax(logits[b, : lengths[b]], -1), [BLANK, 4, 5])
            for k, ids in found.items():
                exact[k] += p[tuple(ids[b])] == max(p.values())
    assert exact["beam"] >= exact["greedy"] + 4, exact  # of 24; measured 21 vs 15


def test_wer_cer_with_jiwer_against_hand_counted_edits():
    refs = ["THE CAT SAT", "ON THE MAT"]
    hyps = ["THE BAT SAT DOWN", "ON MAT"]
    # words: CAT->BAT, +DOWN; -THE = 3 edits / 6 reference words
    # chars: C->B, +" DOWN" (5); -"THE " (4) = 10 edits / 21 reference characters (spaces count)
    assert error_rates(refs, hyps) == {"wer": pytest.approx(3 / 6), "cer": pytest.approx(10 / 21)}


# ------------------------------------------------------------------------------------------- demo split
def _independent_listing(split):
    """{utterance id: (speaker dir, transcript)}, read as LibriSpeech readers do (trans.txt beside the audio)."""
    out = {}
    for trans in sorted(split.glob("*/*/*.trans.txt")):
        spk, ch = trans.parent.parent.name, trans.parent.name
        assert trans.name == f"{spk}-{ch}.trans.txt"
        for line in trans.read_text().splitlines():
            key, text = line.split(" ", 1)
            assert key.startswith(f"{spk}-{ch}-") and (trans.parent / f"{key}.flac").is_file()
            out[key] = (spk, text)
    return out


def test_demo_asr_split_layout(tmp_path):
    from pipelines.demo_asr import build_asr

    summary = build_asr(tmp_path / "a", size="small", skip_existing=False)
    train, test = _independent_listing(tmp_path / "a" / "train-1min"), _independent_listing(tmp_path / "a" / "test")
    assert {spk for spk, _ in train.values()}.isdisjoint({spk for spk, _ in test.values()})  # unseen speakers
    assert all(text == text.upper() and text.strip() for _, text in {**train, **test}.values())
    seconds = sum(sf.info(str(p)).duration for p in (tmp_path / "a" / "train-1min").rglob("*.flac"))
    assert 60 <= seconds < 75 and summary["splits"]["train-1min"]["seconds"] == pytest.approx(seconds, abs=0.5)
    voices = {s["voice"] for group in summary["speakers"].values() for s in group}
    from pipelines import demo_audio

    pretrain = demo_audio.make_speakers(demo_audio.PLANS["full"].speakers, np.random.default_rng([0, 0]))
    assert voices.isdisjoint(s.voice for s in pretrain)  # nobody in the pretraining corpus speaks here
    parsed = read_split(tmp_path / "a" / "train-1min")  # our parser reads the same utterances
    assert {u.key: u.text for u in parsed} == {k: t for k, (_, t) in train.items()}
    again = build_asr(tmp_path / "b", size="small", skip_existing=False)  # deterministic
    assert again == summary
    for p in (tmp_path / "a").rglob("*.flac"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


# -------------------------------------------------------------------------------- a fine-tune that learns
TONES = {"A": 300.0, "B": 600.0, "C": 1200.0}  # each "letter" is a 120 ms tone; words are separated by pauses


def tone_utterance(rng: np.random.Generator, key: str) -> Utterance:
    words = ["".join(rng.choice(list(TONES), rng.integers(1, 4))) for _ in range(rng.integers(1, 4))]
    parts = [np.zeros(int(0.1 * SR))]
    for w in words:
        for c in w:
            parts += [np.sin(2 * np.pi * TONES[c] * np.arange(int(0.12 * SR)) / SR), np.zeros(int(0.04 * SR))]
        parts.append(np.zeros(int(0.15 * SR)))
    wav = np.concatenate(parts).astype(np.float32)
    return Utterance(key, __import__("pathlib").Path(f"/tones/{key}.wav"), " ".join(words), "t",
                     torch.from_numpy((wav - wav.mean()) / wav.std()))


def test_tiny_ctc_finetune_learns_and_transcribes(tmp_path, capsys):
    from workers.cli import main
    from workers.finetune.loop import write_finetuned

    rng = np.random.default_rng(0)
    train = [tone_utterance(rng, f"train-{i}") for i in range(64)]
    test = [tone_utterance(rng, f"test-{i}") for i in range(32)]
    cfg = get_preset("audio", "tiny")
    torch.manual_seed(0)
    enc = Encoder(cfg.model)
    asr = AsrRecipe(updates=200, freeze=0.1)  # the recipe's masking and freeze, scaled to 200 updates
    before = AsrTask(asr).evaluate(enc, AsrTask(asr).build_head(cfg, train), test)
    recipe = Recipe(lr=4e-3, epochs=1, batch_size=8, schedule="tri_stage", warmup=0.1, hold=0.4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two oversubscribed ones on a busy box
    try:
        out = fit(enc, cfg, train, test, asr=asr, recipe=recipe, progress=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert before["cer"] > 0.9  # a random head: mostly wrong symbols
    assert out["cer"] < 0.5, out  # measured 0.23 (lr 2e-3: 0.22); three tone letters, unseen sequences
    # the fine-tuned checkpoint transcribes files through the CLI as the evaluation did
    ckpt = write_finetuned(tmp_path / "ckpt", TASK, cfg, enc, out["head"], {}, None)
    files = []
    for u in test[:6]:
        sf.write(tmp_path / f"{u.key}.wav", u.wave.numpy() * 0.1, SR, subtype="FLOAT")
        files.append(str(tmp_path / f"{u.key}.wav"))
    assert main(["transcribe", str(ckpt), *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == files
    got = [ln.split("\t")[1] for ln in lines]
    assert error_rates([u.text for u in test[:6]], got)["cer"] < 0.5


def test_updates_budget_stops_the_last_epoch_part_way():
    """Recipe.updates (fairseq max_update): exactly that many updates, the last epoch cut short, and the ASR
    freeze a fraction of them; 20 utterances in batches of 8 are 3 updates an epoch."""
    from workers.finetune.loop import fit as loop_fit

    rng = np.random.default_rng(1)
    train = [tone_utterance(rng, f"u-{i}") for i in range(20)]
    cfg = get_preset("audio", "tiny")
    torch.manual_seed(0)
    enc = Encoder(cfg.model)
    recipe = Recipe(lr=1e-3, epochs=99, batch_size=8, schedule="tri_stage", warmup=0.1, hold=0.4, updates=7)
    task = AsrTask(AsrRecipe(freeze=0.3), recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster than two oversubscribed ones on a busy box
    try:
        out = loop_fit(task, cfg, enc, task.build_head(cfg, train), train, train[:2], recipe)
    finally:
        torch.set_num_threads(threads)
    assert out["step"] == 7 and [h["step"] for h in out["history"]] == [3, 6, 7]
    assert task.freeze_updates() == 2  # round(0.3 * 7)


# ----------------------------------------------------------------------------------- Hugging Face export
def test_hf_ctc_export_matches_transformers(tmp_path):
    transformers = require("transformers", "the independent reference for the CTC export")
    from workers.cli import main
    from workers.finetune.loop import write_finetuned
    from workers.finetune.transcribe import load_asr

    cfg = get_preset("audio", "tiny")
    torch.manual_seed(0)
    enc = Encoder(cfg.model)
    head = AsrHead(cfg.model.trunk.dim, CharVocab.from_texts(["HELLO WORLD", "QUICK FOX"]), 0.1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter perturbed: default inits (zero biases, unit norms) hide nothing
        for p in list(enc.parameters()) + list(head.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ckpt = write_finetuned(tmp_path / "ckpt", TASK, cfg, enc, head, {}, None)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0  # `d2v export` of a fine-tuned ASR checkpoint
    hf = transformers.Data2VecAudioForCTC.from_pretrained(out, attn_implementation="eager").eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    _, enc2, head2 = load_asr(ckpt)
    waves = [np.random.default_rng(2).normal(0, 0.1, n).astype(np.float32) for n in (12_000, 9_000)]
    inputs = processor(waves, sampling_rate=SR, padding=True, return_tensors="pt")
    utts = [Utterance(str(i), tmp_path / f"{i}.wav", "", "", torch.from_numpy(w)) for i, w in enumerate(waves)]
    from workers.preprocess import normalize_wave

    for u in utts:
        u.wave = torch.from_numpy(normalize_wave(u.wave.numpy()))
    batch = collate(utts)
    batch["keys"] = None
    with torch.no_grad():
        ref = hf(**inputs).logits  # (B, T, V)
        states, pad = encode(enc2, batch, None)
        ours = head2(states)
    valid = ~pad  # compare the frames of each utterance (padded frames are not defined to agree)
    assert ours.shape == ref.shape
    assert (ours - ref)[valid].abs().max() < 1e-5
    ids = ref.argmax(-1)
    hf_text = processor.batch_decode(ids, skip_special_tokens=True)
    ours_text = [head2.vocab.decode(i) for i in greedy_decode(ours, valid.sum(-1))]
    assert [" ".join(t.split()) for t in hf_text[:1]] == ours_text[:1]  # first utterance is unpadded


# --------------------------------------------------------------------------------------- the Ray Train job
def tone_split(root, n_train: int, n_test: int):
    """Tone "speech" (tone_utterance) as a LibriSpeech-layout corpus: train/ (speaker 7) and test/ (speaker 9)."""
    rng = np.random.default_rng(5)
    for split, spk, n in (("train", 7, n_train), ("test", 9, n_test)):
        d = root / split / str(spk) / "1"
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            u = tone_utterance(rng, f"{spk}-1-{i:04d}")
            sf.write(d / f"{u.key}.flac", u.wave.numpy() * 0.1, SR)
            lines.append(f"{u.key} {u.text}\n")
        (d / f"{spk}-1.trans.txt").write_text("".join(lines))
    return root


def test_finetune_job_registers_a_recogniser_that_transcribes(capsys, tmp_path, mlflow_server, ray_local):
    """`d2v finetune models:/data2vec-audio@candidate --task asr` as a real Ray Train job (1 worker, 160
    updates: enough for transcripts that are not all blank). An MlflowClient reads back
    data2vec-audio-asr@candidate with the parent's name/version and wer/cer tags, the parent version tagged
    finetune.asr.wer/cer, and test_wer/test_cer on the run. From the registry alone, `d2v transcribe` and the
    `d2v export` Hugging Face model (transformers Data2VecAudioForCTC + Wav2Vec2Processor, the independent
    reference) give the same transcripts per test file, and jiwer over those is the recorded WER/CER."""
    import jiwer
    import mlflow
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from model.checkpoint import save_checkpoint
    from model.data2vec import Data2Vec
    from workers import tracking
    from workers.cli import main

    transformers = require("transformers", "the independent reference for the registered recogniser")
    c = MlflowClient(mlflow_server)
    cfg = get_preset("audio", "tiny")
    torch.manual_seed(3)
    ckpt = save_checkpoint(tmp_path / "enc", cfg, Data2Vec(cfg.model), state={"step": 1})
    run = c.create_run(tracking.experiment_id("test-asr-source"))
    c.log_artifacts(run.info.run_id, str(ckpt), "checkpoint")
    _, parent = tracking.register_checkpoint(run.info.run_id, "checkpoint", "audio")
    data = tone_split(tmp_path / "tones", 32, 6)

    capsys.readouterr()
    rc = main(["finetune", "models:/data2vec-audio@candidate", "--task", "asr", "--data", str(data / "train"),
               "--set", "updates=160", "--set", "lr=4e-3", "--workers", "1", "--run-name", "ft-asr",
               "--storage", str(tmp_path / "runs")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert out["model"] == "models:/data2vec-audio-asr@candidate" and out["parent_version"] == parent
    mv = c.get_model_version_by_alias("data2vec-audio-asr", "candidate")
    assert mv.version == out["version"] and mv.run_id == out["run_id"] and mv.tags["task"] == "asr"
    assert mv.tags["parent.name"] == "data2vec-audio" and mv.tags["parent.version"] == parent
    assert (float(mv.tags["test.wer"]), float(mv.tags["test.cer"])) == (out["wer"], out["cer"])
    ptags = c.get_model_version("data2vec-audio", parent).tags
    assert (float(ptags["finetune.asr.wer"]), float(ptags["finetune.asr.cer"])) == (out["wer"], out["cer"])
    assert ptags["finetune.asr.model"] == f"data2vec-audio-asr/{mv.version}"
    for key in ("wer", "cer"):
        assert c.get_metric_history(out["run_id"], f"test_{key}")[-1].value == out[key]
    assert [m.step for m in c.get_metric_history(out["run_id"], "train_loss")][-1] == 160  # 4 updates an epoch, 40 epochs

    # the registered artifacts: encoder + head weights (safetensors) + the vocabulary, no optimizer state; the
    # version is an MLflow Model (workers/registry/finetuned_model.py), the checkpoint files its artifacts
    model_dir = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "registered")))
    assert (model_dir / "MLmodel").is_file()
    art = model_dir / "artifacts"
    assert {"model.safetensors", "config.yaml", "head.safetensors", "head_config.json"} <= {p.name for p in art.iterdir()}
    assert not (art / "optimizer.pt").exists()
    head_cfg = json.loads((art / "head_config.json").read_text())
    assert head_cfg["task"] == "asr" and head_cfg["vocab"]["symbols"] == ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C"]
    assert load_file(art / "head.safetensors")["proj.weight"].shape == (8, cfg.model.trunk.dim)

    files = sorted(str(p) for p in (data / "test").rglob("*.flac"))
    refs = dict(line.split(" ", 1) for line in (data / "test" / "9" / "1" / "9-1.trans.txt").read_text().splitlines())
    assert main(["transcribe", "models:/data2vec-audio-asr@candidate", *files]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == files
    ours = [r[1] if len(r) > 1 else "" for r in rows]

    assert main(["export", "models:/data2vec-audio-asr@candidate", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    hf = transformers.Data2VecAudioForCTC.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "hf")
    theirs = []
    for f in files:  # one file at a time, as `d2v transcribe` does
        wave, sr = sf.read(f, dtype="float32")
        with torch.no_grad():
            ids = hf(**processor(wave, sampling_rate=sr, return_tensors="pt")).logits.argmax(-1)
        theirs.append(" ".join(processor.batch_decode(ids)[0].split()))
    assert ours == theirs and any(theirs)  # not all blank: the head's symbols are compared, not only its blank
    texts = [refs[Path(f).stem] for f in files]
    assert (jiwer.wer(texts, theirs), jiwer.cer(texts, theirs)) == pytest.approx((out["wer"], out["cer"]), abs=1e-12)
    assert main(["transcribe", "models:/data2vec-audio-asr@candidate", "--beam", "8", *files]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()] == files
