"""The `d2v` command line. Each subcommand is a thin layer over a library function; heavy imports are lazy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MODALITIES = ("vision", "audio", "text")


class CLIError(Exception):
    """A user-facing error: printed as `d2v: error: ...` with exit code 2, no traceback."""


# ----------------------------------------------------------------------------------------- commands
def cmd_demo_data(a: argparse.Namespace) -> None:
    from pipelines.demo import build_demo

    if a.modality == "audio-asr":  # transcribed speech with label budgets for `d2v finetune --task asr`
        from pipelines.demo_asr import build_asr

        print(json.dumps(build_asr(a.out, seed=a.seed, size=a.size, skip_existing=a.skip_existing)))
        return
    summary = build_demo(a.modality, a.out, seed=a.seed, skip_existing=a.skip_existing, size=a.size)
    print(json.dumps(summary))


def cmd_shard(a: argparse.Namespace) -> None:
    from pipelines.shard import run_shard

    kw = {}
    if a.samples_per_shard is not None:
        kw["samples_per_shard"] = a.samples_per_shard
    from pipelines.shard import ShardJobError

    try:
        stats = run_shard(a.modality, a.input, a.output, tokenizer=a.tokenizer, overwrite=a.overwrite, **kw)
    except (ShardJobError, ValueError) as err:
        raise CLIError(str(err)) from None
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))


def cmd_pretrain(a: argparse.Namespace) -> None:
    from .pretrain import pretrain, print_summary

    out = pretrain(
        a.modality, a.data, preset=a.preset, version=a.version, overrides=a.set, workers=a.workers,
        gpus_per_worker=a.gpus_per_worker, run_name=a.run_name, storage=a.storage, verbose=a.verbose,
        min_workers=a.min_workers,
    )
    print_summary(out, a.data)


def cmd_register(a: argparse.Namespace) -> None:
    from .outcome import register_run

    print(json.dumps(register_run(a.run_name, storage=a.storage), default=str))


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluate import evaluate

    if a.epochs is not None and a.task != "finetune":
        raise CLIError("--epochs applies to --task finetune only")
    print(json.dumps(evaluate(a.model, data=a.data, task=a.task, promote=a.promote, epochs=a.epochs)))


def cmd_finetune(a: argparse.Namespace) -> None:
    from .finetune.job import finetune

    out = finetune(a.model, a.task, data=a.data, overrides=a.set, workers=a.workers,
                   gpus_per_worker=a.gpus_per_worker, baseline=a.baseline, run_name=a.run_name,
                   storage=a.storage, verbose=a.verbose)
    print(f"d2v finetune: {out['model']} (version {out['version']}): test {out['metric']} "
          f"{out[out['metric']]:.4f}; MLflow run {out['run_id']}", file=sys.stderr, flush=True)
    print(json.dumps(out, default=str))  # the last line: test metrics (+ baseline_*) and where things went


def cmd_workflow(a: argparse.Namespace) -> None:
    from .workflow import Plan, run_workflow

    data = Path(a.data or f"data/{a.modality}").resolve()
    plan = Plan(a.modality, Path(a.input).resolve() if a.input else None, data,
                Path(a.labelled).resolve() if a.labelled else None, preset=a.preset, overrides=a.set,
                workers=a.workers, task=a.task, version=a.version, finetune=a.finetune,
                finetune_data=Path(a.finetune_data).resolve() if a.finetune_data else None,
                finetune_overrides=a.finetune_set)
    state = run_workflow(plan)
    print(json.dumps({k: {"status": v.get("status"), "fingerprint": v.get("fingerprint")} for k, v in state.items()}))
    ev = state.get("evaluate", {}).get("outputs", {})
    if ev:
        print(json.dumps(ev, default=str))


def cmd_embed(a: argparse.Namespace) -> None:
    if a.data is not None and a.inputs:
        raise CLIError("give INPUT files (per-file states -> --out FILE.npz) or --data DIR (batch mode -> --out "
                       "DIR of Parquet), not both")
    if a.data is None and not a.inputs:
        raise CLIError("nothing to embed: give INPUT files, or --data DIR for a shard set / folder")
    if a.data is None and (a.batch_size is not None or a.actors is not None):
        raise CLIError("--batch-size and --actors apply to the batch mode (--data DIR) only")
    if a.data is not None:
        from .embed_batch import EmbedJobError
        from .embed_job import run_embed_job

        try:
            m = run_embed_job(a.model, a.data, a.out, batch_size=a.batch_size or 32, actors=a.actors or 2)
        except EmbedJobError as err:
            raise CLIError(str(err)) from None
        print(json.dumps({"out": str(a.out), "model_version": m["model_version"], **m["counts"]}))
        return
    from model.checkpoint import load_encoder

    from .embed import embed_files, save_npz
    from .registry import resolve_model

    ckpt = resolve_model(a.model)
    cfg, enc = load_encoder(ckpt, which="student")
    tok = ckpt / "tokenizer.json"
    arrays = embed_files(enc, cfg, [Path(p) for p in a.inputs], tok if tok.is_file() else None)
    save_npz(arrays, Path(a.out))
    print(json.dumps({"out": str(a.out), "shapes": {k: list(v.shape) for k, v in arrays.items()}}))


def cmd_export(a: argparse.Namespace) -> None:
    from model.hf import export_checkpoint

    from .registry import resolve_model

    from .finetune.export import export_finetuned, is_finetuned

    ckpt = resolve_model(a.model)
    if is_finetuned(ckpt):  # encoder + task head: the HF model of its task (ForSequenceClassification, ...)
        export_finetuned(ckpt, a.out)
    else:
        export_checkpoint(ckpt, a.out)
    print(json.dumps({"exported": str(a.out), "format": a.format}))


def cmd_import(a: argparse.Namespace) -> None:
    from model.hf import import_checkpoint

    import_checkpoint(a.hf_dir, a.out)
    print(json.dumps({"checkpoint": str(a.out)}))


def cmd_transcribe(a: argparse.Namespace) -> None:
    from .finetune import FinetuneError
    from .finetune.transcribe import main_transcribe

    try:
        rows = main_transcribe(a.model, a.audio, beam=a.beam)
    except FinetuneError as err:
        raise CLIError(str(err)) from None
    for path, text in rows:
        print(f"{path}\t{text}")


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from model.presets import DEFAULT_VERSION  # the one table; main() imports model.config right after anyway

    version_help = "data2vec version (default: per modality, " + ", ".join(
        f"{m} {v}" for m, v in DEFAULT_VERSION.items()) + ")"
    p = argparse.ArgumentParser(prog="d2v", description="data2vec pretraining pipelines for vision, audio and text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo-data", help="build an offline demo corpus in the real datasets' layout")
    s.add_argument("modality", choices=(*MODALITIES, "audio-asr"),
                   help="audio-asr: transcribed demo speech (train-10min, train-1h, test) for --task asr")
    s.add_argument("out", help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=("small", "full"), default="full")
    s.add_argument("--skip-existing", action="store_true", help="return at once if OUT is already built")
    s.set_defaults(fn=cmd_demo_data)

    s = sub.add_parser("shard", help="shard a raw corpus into WebDataset tarballs with Ray Data")
    s.add_argument("modality", choices=MODALITIES)
    s.add_argument("--input", required=True, help="source directory (local path or pyarrow filesystem URI)")
    s.add_argument("--output", required=True, help="destination directory for shards and manifest")
    s.add_argument("--samples-per-shard", type=int, default=None)
    s.add_argument("--tokenizer", default=None, help="text: an existing tokenizer.json (else BPE is trained)")
    s.add_argument("--overwrite", action="store_true", help="replace shards built from different inputs")
    s.set_defaults(fn=cmd_shard)

    s = sub.add_parser("pretrain", help="data2vec pretraining on Ray Train, tracked and registered in MLflow")
    s.add_argument("modality", choices=MODALITIES)
    s.add_argument("--data", required=True, help="shard directory written by `d2v shard`")
    s.add_argument("--preset", choices=("tiny", "base", "large"), default="tiny")
    s.add_argument("--version", choices=("v1", "v2"), default=None, help=version_help)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    s.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    s.add_argument("--min-workers", type=int, default=None, metavar="N",
                   help="elastic: after a node is lost, continue from the last checkpoint with the workers that fit "
                   "(at least N; grows back to --workers when nodes return). Default: --workers (fixed; a lost "
                   "node's capacity is waited for)")
    s.add_argument("--gpus-per-worker", type=float, default=0)
    s.add_argument("--run-name", default=None, help="same name = resume from its last checkpoint")
    s.add_argument("--storage", default=None, help="where the run's checkpoints go: a folder or s3://, gs:// "
                   "URI reachable from every node (default: $D2V_STORAGE, else runs/)")
    s.add_argument("--verbose", action="store_true",
                   help="show Ray's full stream on the console (else it goes to <storage>/<run>/driver.log)")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("register", help="record a finished pretraining run in MLflow (metrics kept while the "
                       "server was away, checkpoint, model version, FINISHED): what `d2v pretrain` exit 5 asks for")
    s.add_argument("run_name", help="the --run-name of the finished run")
    s.add_argument("--storage", default=None, help="the run's --storage (default: $D2V_STORAGE, else runs/)")
    s.set_defaults(fn=cmd_register)

    s = sub.add_parser("evaluate", help="linear-probe or fine-tune accuracy on a labelled split; optional promotion")
    s.add_argument("model", help="checkpoint dir, runs:/..., models:/name@alias or models:/name/N")
    s.add_argument("--data", default=None,
                   help="labelled split LABELLED/{train,test}/<class>/<file> (default: the demo corpus of the modality)")
    s.add_argument("--task", choices=("linear-probe", "finetune"), default="linear-probe")
    s.add_argument("--promote", action="store_true", help="move alias 'champion' here if it beats the champion")
    s.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: the modality's recipe)")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("finetune", help="fine-tune an encoder + task head on Ray Train; registers "
                       "data2vec-<modality>-<task>@candidate")
    s.add_argument("model", help="checkpoint dir, runs:/..., models:/name@alias or models:/name/N")
    s.add_argument("--task", choices=("classify", "asr"), required=True)
    s.add_argument("--data", default=None, help="labelled data: classify: LABELLED/{train,test}/<class>/<file> or "
                   "a GLUE task dir (train.tsv, dev.tsv); asr: LibriSpeech layout (default: the modality's demo split)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tuning recipe override (lr, epochs, updates, batch_size, ...), repeatable; "
                   "updates=N: exactly N updates whatever the split's size (equal budgets)")
    s.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    s.add_argument("--gpus-per-worker", type=float, default=0)
    s.add_argument("--baseline", action="store_true",
                   help="also fine-tune a random-init encoder of the same config with the same recipe")
    s.add_argument("--run-name", default=None, help="same name = resume from its last checkpoint")
    s.add_argument("--storage", default=None, help="where the run's checkpoints go (default: $D2V_STORAGE, else runs/)")
    s.add_argument("--verbose", action="store_true", help="show Ray's full stream on the console")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("workflow", help="shard -> pretrain -> register -> evaluate -> promote, skipping done stages")
    s.add_argument("modality", choices=MODALITIES)
    s.add_argument("--input", default=None, help="raw corpus (default: the demo corpus, built when missing)")
    s.add_argument("--data", default=None, help="shard directory (default: data/<modality>)")
    s.add_argument("--labelled", default=None, help="labelled split for evaluation (default: the demo corpus's)")
    s.add_argument("--preset", choices=("tiny", "base", "large"), default="tiny")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    s.add_argument("--version", choices=("v1", "v2"), default=None, help=version_help)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--task", choices=("linear-probe", "finetune"), default="linear-probe")
    s.add_argument("--finetune", choices=("classify", "asr"), default=None,
                   help="add a fine-tune stage after evaluation (`d2v finetune --task T`), promoted by its metric")
    s.add_argument("--finetune-data", default=None, help="labelled data of the fine-tune stage (default: demo)")
    s.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override of the fine-tune stage (as `d2v finetune --set`), repeatable")
    s.set_defaults(fn=cmd_workflow)

    s = sub.add_parser("embed", help="final-layer hidden states [T, D] per input (.npz), or --data: pooled "
                       "embeddings of a shard set as Parquet (Ray Data)")
    s.add_argument("model", help="checkpoint dir, runs:/..., or models:/name@alias")
    s.add_argument("inputs", nargs="*", help="image / audio / .txt / .json / .npy files")
    s.add_argument("--out", required=True, help="output .npz (one array per input, keyed by file stem); with "
                   "--data: output directory (one Parquet per shard, rejects.parquet, manifest.json)")
    s.add_argument("--data", default=None, help="batch mode: a `d2v shard` output directory or a folder of files")
    s.add_argument("--batch-size", type=int, default=None, help="batch mode: inputs per forward pass (default 32)")
    s.add_argument("--actors", type=int, default=None, help="batch mode: Ray actors, one model each (default 2)")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("export", help="export a checkpoint as a Hugging Face Data2Vec*Model directory")
    s.add_argument("model", help="checkpoint dir, runs:/..., or models:/name@alias")
    s.add_argument("--format", choices=("hf",), default="hf")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("import", help="import a Hugging Face Data2Vec*Model directory as a d2v checkpoint")
    s.add_argument("hf_dir")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("transcribe", help="a CTC fine-tuned speech model's transcripts: FILE<TAB>TEXT per file")
    s.add_argument("model", help="fine-tuned checkpoint dir, runs:/..., or models:/data2vec-audio-asr@candidate")
    s.add_argument("--beam", type=int, default=0, help="CTC beam search with this beam size (flashlight-text, no "
                   "language model); 0 (default): greedy decoding, what fine-tuning reports WER/CER with")
    s.add_argument("audio", nargs="+", help="audio files (.flac, .wav, ...), 16 kHz or resampled")
    s.set_defaults(fn=cmd_transcribe)
    return p


def _runs_on_ray(a: argparse.Namespace) -> bool:
    """The stages that need a Ray cluster (the others run here whatever RAY_ADDRESS says)."""
    return a.command in ("shard", "pretrain", "workflow", "finetune") or (a.command == "embed" and a.data is not None)


def _outcomes() -> list[tuple[tuple[type[Exception], ...], int, str]]:
    """(exceptions, exit code, what the console line says) for the errors d2v explains in one paragraph; what
    each code means for `d2v pretrain`: workers/resume.py EXIT_CODES."""
    from model.config import ConfigError

    from .embed import InputError
    from .evaluate import EvaluationError
    from .finetune import FinetuneError
    from .pretrain import DataError
    from .resume import AlreadyComplete, FailuresExhausted, RecordPending
    from .tracking import TrackingUnavailable
    from .train import TrainingStopped
    from .workflow import WorkflowError

    usage = (CLIError, ConfigError, InputError, FileNotFoundError, FileExistsError, DataError, TrackingUnavailable,
             EvaluationError, FinetuneError)
    return [(usage, 2, "error"), ((WorkflowError,), 1, "error"), ((TrainingStopped,), 3, "training stopped"),
            ((FailuresExhausted,), 4, "error"), ((RecordPending,), 5, "not recorded"),
            ((AlreadyComplete,), 6, "nothing to do")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .submit import JobFailed, jobs_address

    if jobs_address() and _runs_on_ray(args):  # RAY_ADDRESS=http://head:8265: the same command, as a Ray job
        from .submit import submit_job

        try:
            submit_job(jobs_address(), sys.argv[1:] if argv is None else list(argv))
        except JobFailed as err:
            print(f"d2v {args.command}: error: {err}", file=sys.stderr)
            return err.exit_code or 1
        except ConnectionError as err:  # no Jobs API there (JobSubmissionClient checks at once)
            print(f"d2v {args.command}: error: cannot reach the Ray Jobs API at RAY_ADDRESS={jobs_address()!r}: "
                  f"{err}", file=sys.stderr)
            return 2
        except RuntimeError as err:  # the Jobs API refused the submission (its message says why)
            print(f"d2v {args.command}: error: RAY_ADDRESS={jobs_address()!r} refused the job: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        args.fn(args)
    except ConnectionError as err:  # ray.init could not reach RAY_ADDRESS
        print(f"d2v {args.command}: error: cannot reach the Ray cluster (RAY_ADDRESS="
              f"{os.environ.get('RAY_ADDRESS', '')!r}): {err}", file=sys.stderr)
        return 2
    except Exception as err:
        for kinds, code, said in _outcomes():
            if isinstance(err, kinds):  # one paragraph, no traceback
                print(f"d2v {args.command}: {said}: {err}", file=sys.stderr)
                return code
        raise  # a bug: Python's traceback (exit 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
