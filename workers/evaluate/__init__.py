"""`d2v evaluate`: score an encoder on a labelled split, beside a random-init twin and the raw input; record
the result in MLflow; optionally promote it.

MODEL is a checkpoint directory, `runs:/…`, `models:/name@alias`, `models:/name/N` or `models:/name/latest`
(resolve.py). Weights are read from safetensors. Data: `LABELLED/{train,test}/<class>/<file>` (data.py).

Tasks (both report test accuracy):
- linear-probe: frozen encoder -> mean-pooled features (features.py) -> StandardScaler + LogisticRegression
  fitted on train (probe.py).
- finetune: encoder + head on LayerNorm'd pooled features, linear-probe-then-fine-tune with per-modality
  recipes (finetune.py).
Beside `accuracy` every evaluation reports (baselines.py) `baseline_accuracy` (the same task on a seeded
random-init encoder of the same config) and `raw_accuracy` (the probe on the raw input: 8x8 grey pixels,
MFCC mean+std, TF-IDF). MLflow runs, version tags and promotion to `champion`: record.py.

Files: common (errors, progress), resolve, data, features, probe, baselines, finetune, record, api.
"""

from .api import TASKS, Opts, evaluate, score, score_and_record
from .baselines import BASELINE_SEED, RAW, random_encoder, raw_accuracy
from .common import EvaluationError, Progress, log
from .data import (EXTENSIONS, PAD_IS_EXACT, SPLITS, Group, Split, batches, collate, default_data, fingerprint,
                   load_split, read_input)
from .features import POOLING, features, pool
from .finetune import FINETUNE_PRESETS, ClassifierHead, FinetuneConfig, finetune_accuracy, finetune_preset
from .probe import fit_probe, linear_probe
from .record import CHAMPION, champion_accuracy, log_run, promote_version, tag_version
from .resolve import ModelRef, resolve_ref

__all__ = [
    "BASELINE_SEED", "CHAMPION", "EXTENSIONS", "FINETUNE_PRESETS", "PAD_IS_EXACT", "POOLING", "RAW", "SPLITS",
    "TASKS", "ClassifierHead", "EvaluationError", "FinetuneConfig", "Group", "ModelRef", "Opts", "Progress",
    "Split", "batches", "champion_accuracy", "collate", "default_data", "evaluate", "features",
    "finetune_accuracy", "finetune_preset", "fingerprint", "fit_probe", "linear_probe", "load_split", "log",
    "log_run", "pool", "promote_version", "random_encoder", "raw_accuracy", "read_input", "resolve_ref", "score",
    "score_and_record", "tag_version",
]
