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
    import os

    from .pretrain import pretrain, print_summary

    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        from .submit import submit_job

        submit_job(address, ["d2v", *sys.argv[1:]] if a.argv is None else a.argv)
        return
    out = pretrain(
        a.modality, a.data, preset=a.preset, version=a.version, overrides=a.set, workers=a.workers,
        gpus_per_worker=a.gpus_per_worker, run_name=a.run_name, verbose=a.verbose,
    )
    print_summary(out, a.data)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluate import evaluate

    if a.epochs is not None and a.task != "finetune":
        raise CLIError("--epochs applies to --task finetune only")
    print(json.dumps(evaluate(a.model, data=a.data, task=a.task, promote=a.promote, epochs=a.epochs)))


def cmd_workflow(a: argparse.Namespace) -> None:
    from .workflow import Plan, run_workflow

    data = Path(a.data or f"data/{a.modality}").resolve()
    plan = Plan(a.modality, Path(a.input).resolve() if a.input else None, data,
                Path(a.labelled).resolve() if a.labelled else None, preset=a.preset, overrides=a.set,
                workers=a.workers, task=a.task)
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

    export_checkpoint(resolve_model(a.model), a.out)
    print(json.dumps({"exported": str(a.out), "format": a.format}))


def cmd_import(a: argparse.Namespace) -> None:
    from model.hf import import_checkpoint

    import_checkpoint(a.hf_dir, a.out)
    print(json.dumps({"checkpoint": str(a.out)}))


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2v", description="data2vec pretraining pipelines for vision, audio and text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo-data", help="build an offline demo corpus in the real datasets' layout")
    s.add_argument("modality", choices=MODALITIES)
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
    s.add_argument("--version", choices=("v1", "v2"), default="v1")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    s.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    s.add_argument("--gpus-per-worker", type=float, default=0)
    s.add_argument("--run-name", default=None, help="same name = resume from its last checkpoint")
    s.add_argument("--verbose", action="store_true",
                   help="show Ray's full stream on the console (else it goes to <storage>/<run>/driver.log)")
    s.set_defaults(fn=cmd_pretrain, argv=None)

    s = sub.add_parser("evaluate", help="linear-probe or fine-tune accuracy on a labelled split; optional promotion")
    s.add_argument("model", help="checkpoint dir, runs:/..., models:/name@alias or models:/name/N")
    s.add_argument("--data", default=None,
                   help="labelled split LABELLED/{train,test}/<class>/<file> (default: the demo corpus of the modality)")
    s.add_argument("--task", choices=("linear-probe", "finetune"), default="linear-probe")
    s.add_argument("--promote", action="store_true", help="move alias 'champion' here if it beats the champion")
    s.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: the modality's recipe)")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("workflow", help="shard -> pretrain -> register -> evaluate -> promote, skipping done stages")
    s.add_argument("modality", choices=MODALITIES)
    s.add_argument("--input", default=None, help="raw corpus (default: the demo corpus, built when missing)")
    s.add_argument("--data", default=None, help="shard directory (default: data/<modality>)")
    s.add_argument("--labelled", default=None, help="labelled split for evaluation (default: the demo corpus's)")
    s.add_argument("--preset", choices=("tiny", "base", "large"), default="tiny")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--task", choices=("linear-probe", "finetune"), default="linear-probe")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from model.config import ConfigError

    from .embed import InputError
    from .evaluate import EvaluationError
    from .pretrain import DataError
    from .tracking import TrackingUnavailable
    from .train import TrainingStopped
    from .workflow import WorkflowError

    try:
        args.fn(args)
    except (CLIError, ConfigError, InputError, FileNotFoundError, FileExistsError, DataError,
            TrackingUnavailable, EvaluationError) as err:
        print(f"d2v {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # ray.init could not reach RAY_ADDRESS
        print(f"d2v {args.command}: error: cannot reach the Ray cluster (RAY_ADDRESS="
              f"{os.environ.get('RAY_ADDRESS', '')!r}): {err}", file=sys.stderr)
        return 2
    except WorkflowError as err:
        print(f"d2v {args.command}: error: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as err:
        print(f"d2v {args.command}: training stopped: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
