"""Object storage for real: the driver's view of a shard set in an S3-compatible server on loopback (moto's,
tests/conftest.py: s3_server), configured only by the standard AWS_* variables, written by boto3 (the
independent client).

The end-to-end path (d2v shard --output s3:// -> d2v pretrain --data s3:// --storage s3:// -> registration
through an MLflow server with --artifacts-destination s3:// -> d2v evaluate models:/...) runs on the two-node
cluster in tests/test_multinode.py, so one cluster start-up covers both.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import require


def test_the_driver_reads_a_text_shard_set_from_object_storage_before_any_cluster_time(s3_server):
    """inspect_data lists the shards and reads stats.json from the bucket, the tokenizer's vocabulary sizes the
    model, and a missing manifest or the wrong modality is refused naming the object — no Ray involved."""
    boto3 = require("boto3", "the independent S3 client")
    from tokenizers import Tokenizer, models

    from model.presets import get_preset
    from workers.pretrain import DataError, fit_config_to_data, inspect_data
    from workers.storage import local_copy

    s3, bucket, prefix = boto3.client("s3"), s3_server.bucket, "inspect/text"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *"abcdef"])}, unk_token="[UNK]")).to_str()
    objects = {"stats.json": json.dumps({"modality": "text", "samples": 3, "fingerprint": "fp-s3"}),
               "manifest.parquet": "", "text-000000.tar": "", "text-000001.tar": "", "tokenizer.json": tok}
    for name, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body.encode())
    uri = f"s3://{bucket}/{prefix}"

    info = inspect_data("text", uri)
    assert info.shards == [f"{uri}/text-000000.tar", f"{uri}/text-000001.tar"]
    assert (info.num_samples, info.fingerprint, info.root, info.tokenizer) == (3, "fp-s3", uri, f"{uri}/tokenizer.json")
    assert fit_config_to_data(get_preset("text", "tiny"), info, []).model.frontend.vocab_size == 7
    assert local_copy(info.tokenizer).read_text() == tok  # what each Train worker copies into its checkpoints

    with pytest.raises(DataError, match="'text' data, not 'audio'"):
        inspect_data("audio", uri)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet")
    with pytest.raises(DataError, match=rf"--data {uri}: manifest.parquet is missing"):
        inspect_data("text", uri)
    with pytest.raises(DataError, match="no such directory"):
        inspect_data("text", f"s3://{bucket}/nothing/here")
