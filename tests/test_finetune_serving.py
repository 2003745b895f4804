"""Fine-tuned versions (`data2vec-<modality>-classify`, `data2vec-audio-asr`) as MLflow consumers use them, against
a real MLflow server: `mlflow.pyfunc.load_model` in a Python that cannot import d2v (only the code the model
carries, nothing unpickled) and `mlflow models serve` over real HTTP.

Independent references: d2v's own in-process encoder + head on the fine-tuned checkpoint (labels and softmax
probabilities, <= 1e-5; inputs read by `d2v embed`'s file reader, not the pyfunc's decoders) and
workers/finetune/transcribe.py's greedy transcripts (`d2v transcribe` without --beam).

The versions are registered by `workers/finetune/register.register` (the call `d2v finetune` makes after its Ray
Train job; tests/test_finetune.py and tests/test_asr.py run that job end to end) on tiny checkpoints written
here with perturbed random weights, so no fine-tune runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from model.ctc import CharVocab
from model.encoder import Encoder
from model.presets import get_preset
from tests.registry_helpers import consumer_inputs, make_checkpoint, write_inputs
from tests.test_serving import CONSUMER_START

pytestmark = pytest.mark.slow
ATOL = 1e-5
CLASSES = ["checker", "horizontal", "vertical"]

# The consumer: as tests/test_serving.py's, a Python without site processing (-S) and isolated (-I), given only
# the venv's site-packages directory; pickle and torch.load refuse to run.
CONSUMER = CONSUMER_START + r"""out = {"predictions": {}, "errors": {}, "outputs": {}}
for kind, s in spec.items():
    m = mlflow.pyfunc.load_model(s["uri"])
    items = [bytes.fromhex(x["hex"]) if isinstance(x, dict) and "hex" in x else x for x in s["inputs"]]
    out["predictions"][kind] = m.predict(items)
    out["outputs"][kind] = m.metadata.signature.outputs.to_dict()
    try:
        m.predict(s["bad"])
    except Exception as err:
        out["errors"][kind] = str(err)
out["modules"] = {k: getattr(v, "__file__", None) for k, v in sys.modules.items()
                  if k.split(".")[0] in ("model", "workers", "pipelines")}
print(json.dumps(out))
"""


def perturbed(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter moved off its init: default inits (zero biases, unit norms, near-uniform heads) hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def finetuned_checkpoint(root: Path, modality: str, task_name: str) -> Path:
    """A fine-tuned checkpoint directory as the job writes it (loop.write_finetuned): encoder + head + head config."""
    from model.checkpoint import load_config
    from workers.finetune.loop import write_finetuned
    from workers.finetune.tasks import get_task

    base = make_checkpoint(root / "encoder", modality, seed=5)  # text: with its tokenizer.json
    cfg = load_config(base)
    tok = base / "tokenizer.json" if (base / "tokenizer.json").is_file() else None
    torch.manual_seed(0)
    task = get_task(task_name)
    enc = perturbed(Encoder(cfg.model), 1, 0.05)
    if task_name == "asr":
        head = task.restore_head(cfg, {"vocab": CharVocab.from_texts(["HELLO WORLD", "QUICK FOX"]).to_json()})
    else:
        head = task.restore_head(cfg, {"classes": CLASSES, "head": task.ft(modality).head})
    head = perturbed(head, 2, 0.5)  # probabilities far from uniform, transcripts not all blank
    return write_finetuned(root / "finetuned", task, cfg, enc, head, {"epoch": 1}, tok)


def prepared(ckpt: Path, task_name: str):
    """What `d2v finetune` hands to register(): the job's Prepared (parent = a plain checkpoint directory)."""
    from model.checkpoint import load_config
    from workers.evaluate.resolve import ModelRef
    from workers.finetune.job import Prepared
    from workers.finetune.tasks import get_task

    task, cfg = get_task(task_name), load_config(ckpt)
    return Prepared(task, ModelRef(str(ckpt), str(ckpt)), ckpt, cfg, task.recipe(cfg.model.modality), ckpt, [], [],
                    "fp-serving")


KINDS = {"vision-classify": ("vision", "classify", {"accuracy": 0.5}),
         "text-classify": ("text", "classify", {"accuracy": 0.25}),
         "audio-asr": ("audio", "asr", {"wer": 0.9, "cer": 0.7})}


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """kind -> dict(uri, ckpt, run_id, version, input paths), each registered by register.register."""
    from mlflow import MlflowClient

    from workers import tracking
    from workers.finetune.register import register

    c = MlflowClient(mlflow_server)
    root = tmp_path_factory.mktemp("finetune-serving")
    out = {}
    for kind, (modality, task_name, metrics) in KINDS.items():
        ckpt = finetuned_checkpoint(root / kind, modality, task_name)
        run_id = c.create_run(tracking.experiment_id("test-finetune-serving")).info.run_id
        name, version = register(c, run_id, ckpt, prepared(ckpt, task_name), metrics, f"serve-{kind}")
        assert name == f"data2vec-{kind}"
        out[kind] = {"uri": f"models:/{name}@candidate", "name": name, "version": version, "ckpt": ckpt,
                     "run_id": run_id, "paths": write_inputs(root / f"in-{kind}", modality), "metrics": metrics}
    return out


@torch.no_grad()
def reference_classify(ckpt: Path, paths: list[Path]) -> list[dict]:
    """d2v's own classifier, in this process: each file read by `d2v embed`'s reader, encoder + head forward."""
    from model.heads import head_logits
    from workers.evaluate.data import read_input
    from workers.finetune.classify import forward
    from workers.finetune.export import load_finetuned

    _, cfg, enc, head = load_finetuned(ckpt)
    tok = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").is_file() else None
    out = []
    for p in paths:
        logits = head_logits(head, forward(enc, read_input(p, cfg, tok)[None], None))  # (1, C)
        probs = torch.softmax(logits, -1)[0]
        out.append({"label": head.classes[int(probs.argmax())], "probabilities": probs.tolist()})
    return out


def consumer_items(kind: str, paths: list[Path]) -> list:
    modality = KINDS[kind][0]
    return [{"hex": x.hex()} if isinstance(x, bytes) else x for x in consumer_inputs(modality, paths)]


BAD = {"vision": [{"b64": "bm90IGFuIGltYWdl"}, 7], "text": [None, 3.5], "audio": [[], "/no/such.wav"]}


def test_consumer_without_d2v_classifies_and_transcribes_as_d2v_does(registered, tmp_path):
    """The consumer's labels / probabilities equal d2v's encoder + head on the same files (<= 1e-5), its
    transcripts equal `d2v transcribe`'s greedy ones (workers/finetune/transcribe.py); every d2v module it ran came
    from the model's code/ folder; the signature's outputs are typed; a bad batch names each bad item."""
    from workers.finetune.transcribe import transcribe_files

    spec = {kind: {"uri": r["uri"], "inputs": consumer_items(kind, r["paths"]),
                   "bad": BAD[KINDS[kind][0]] + [consumer_inputs(KINDS[kind][0], r["paths"], json_only=True)[0]]}
            for kind, r in registered.items()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "consumer.py").write_text(CONSUMER)
    site = sysconfig.get_paths()["purelib"]
    cmd = [sys.executable, "-I", "-S", str(tmp_path / "consumer.py"), site, str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    repo = str(Path(__file__).resolve().parent.parent)
    assert result["modules"] and all(f and not f.startswith(repo) and f"{os.sep}code{os.sep}" in f
                                     for f in result["modules"].values()), result["modules"]

    for kind in ("vision-classify", "text-classify"):
        r, got = registered[kind], result["predictions"][kind]
        want = reference_classify(r["ckpt"], r["paths"])
        assert [g["label"] for g in got] == [w["label"] for w in want], kind
        assert all(list(g["probabilities"]) == CLASSES for g in got), got
        np.testing.assert_allclose([list(g["probabilities"].values()) for g in got],
                                   [w["probabilities"] for w in want], atol=ATOL, rtol=0, err_msg=kind)
        assert max(max(w["probabilities"]) for w in want) > 0.5  # not a near-uniform head: labels are not ties
        assert result["outputs"][kind] == [{"type": "object", "required": True, "properties": {
            "label": {"type": "string", "required": True},
            "probabilities": {"type": "map", "values": {"type": "double"}, "required": True}}}], result["outputs"]
        assert "2 of 3" in result["errors"][kind] and "cannot be classified" in result["errors"][kind]

    r = registered["audio-asr"]
    want = transcribe_files(r["ckpt"], r["paths"])  # greedy, one file at a time
    assert any(want), want  # a test of symbols, not only of the blank
    assert result["predictions"]["audio-asr"] == want
    assert result["outputs"]["audio-asr"] == [{"type": "string", "required": True}], result["outputs"]
    err = result["errors"]["audio-asr"]
    assert "2 of 3 audio inputs cannot be transcribed" in err and "[0] empty audio" in err and "[1] no such" in err


def test_d2v_reads_the_registered_versions_and_does_not_register_twice(registered, mlflow_server, capsys):
    """`d2v transcribe models:/data2vec-audio-asr@candidate` (resolve_model -> the MLflow Model's artifacts, a
    fine-tuned checkpoint directory) prints transcribe.py's transcripts of the local checkpoint; load_finetuned of
    the registered classifier holds the local head's weights; registering the same weights of the same run again
    makes no new version (weights_sha256)."""
    from mlflow import MlflowClient

    from model.checkpoint import load_tensors
    from workers.cli import main
    from workers.finetune.export import load_finetuned
    from workers.finetune.register import register
    from workers.finetune.transcribe import transcribe_files

    r = registered["audio-asr"]
    capsys.readouterr()
    assert main(["transcribe", r["uri"], *map(str, r["paths"])]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [row[0] for row in rows] == list(map(str, r["paths"]))
    assert [row[1] if len(row) > 1 else "" for row in rows] == transcribe_files(r["ckpt"], r["paths"])

    r = registered["text-classify"]
    task, _, _, head = load_finetuned(r["uri"])
    assert task.name == "classify" and head.classes == CLASSES
    for k, v in load_tensors(r["ckpt"] / "head.safetensors").items():
        assert torch.equal(head.state_dict()[k], v), k

    c = MlflowClient(mlflow_server)
    before = len(c.search_model_versions(f"name = '{r['name']}'"))
    again = register(c, r["run_id"], r["ckpt"], prepared(r["ckpt"], "classify"), r["metrics"], "serve-again")
    assert again == (r["name"], r["version"]) and len(c.search_model_versions(f"name = '{r['name']}'")) == before
    mv = c.get_model_version_by_alias(r["name"], "candidate")
    assert mv.version == r["version"] and mv.tags["task"] == "classify" and float(mv.tags["test.accuracy"]) == 0.25


def test_rest_serving_of_a_classifier_matches_d2v(registered, tmp_path):
    """`mlflow models serve -m models:/data2vec-vision-classify@candidate` (tests/test_serving.py's start-up and
    curl): {"inputs": [{"b64": ...}]} -> {"predictions": [{"label", "probabilities": {class: p}}]} equal to d2v's
    encoder + head (<= 1e-5); a bad item -> HTTP 400 naming it."""
    from tests.test_serving import _curl, _serve, _stop

    r = registered["vision-classify"]
    port, proc = _serve(r["uri"], tmp_path)
    try:
        items = consumer_inputs("vision", r["paths"], json_only=True)
        status, body = _curl(port, {"inputs": items}, tmp_path / "classify.json")
        assert status == 200, body
        want = reference_classify(r["ckpt"], r["paths"])
        assert [p["label"] for p in body["predictions"]] == [w["label"] for w in want]
        np.testing.assert_allclose([[p["probabilities"][c] for c in CLASSES] for p in body["predictions"]],
                                   [w["probabilities"] for w in want], atol=ATOL, rtol=0)
        status, body = _curl(port, {"inputs": [items[0], 7]}, tmp_path / "bad.json")
        assert status == 400 and "[1] wrong type int" in body["message"], body
    finally:
        _stop(proc)
