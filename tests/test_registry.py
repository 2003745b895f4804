"""Registration against a real MLflow server: a version is an MLflow Model (pyfunc from code) holding only what a
consumer needs, tagged and described; the same weights of the same run never make a second version (also when a
finished `d2v pretrain` finishes again); old-format versions (raw checkpoint directories) still resolve."""

from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import version as installed
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from model.checkpoint import load_encoder
from tests.registry_helpers import embed_reference, log_training_run, make_checkpoint, write_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server)


def versions(client, name: str) -> list[str]:
    return sorted((mv.version for mv in client.search_model_versions(f"name = '{name}'")), key=int)


def test_version_is_a_pyfunc_model_with_only_what_consumers_need(client, tmp_path):
    import mlflow

    from workers import tracking
    from workers.registry import resolve_model

    ckpt = make_checkpoint(tmp_path / "ckpt", "text", seed=5, step=7)
    run_id = log_training_run(client, ckpt, "text", "reg-text", fingerprint="fp-123")
    name, v = tracking.register_checkpoint(run_id, "checkpoint", "text", name="test-reg-text")
    assert client.get_model_version_by_alias(name, "candidate").version == v

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v}", dst_path=str(tmp_path / "dl")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: no pickled object
    assert Path(flavor["model_code_path"]).name == "pyfunc_model.py" and (local / "pyfunc_model.py").is_file()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pt"))
    assert {p.name for p in (local / "artifacts").iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json"}
    assert (local / "artifacts" / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    for f in ("model/encoder.py", "workers/preprocess.py", "pipelines/tokenizer.py", "pipelines/decode.py"):
        assert (local / "code" / f).is_file(), f
    reqs = (local / "requirements.txt").read_text().split()
    for dist in ("mlflow", "torch", "numpy", "safetensors", "tokenizers", "pydantic", "pyyaml"):
        assert f"{dist}=={installed(dist).split('+')[0]}" in reqs, (dist, reqs)
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    sig = mlflow.models.get_model_info(f"models:/{name}/{v}").signature
    assert [p.name for p in sig.params.params] == ["output"] and sig.params.params[0].default == "pooled"

    mv = client.get_model_version(name, v)
    want = {"modality": "text", "preset": "text-tiny", "version": "v1", "step": "7", "data_fingerprint": "fp-123",
            "git_commit": "0123456789abcdef", "run_name": "reg-text", "run_id": run_id}
    assert want.items() <= mv.tags.items()
    assert "'reg-text'" in mv.description and run_id in mv.description and mv.run_id == run_id

    # d2v's own consumers read the new format: resolve -> the artifacts folder -> the same student encoder
    resolved = resolve_model(f"models:/{name}@candidate")
    _, enc = load_encoder(resolved)
    _, ref = load_encoder(ckpt)
    for (k, a), (_, b) in zip(enc.state_dict().items(), ref.state_dict().items(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k


def test_in_process_predict_rejects_bad_params_and_inputs(client, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from workers import tracking

    ckpt = make_checkpoint(tmp_path / "ckpt", "vision", seed=6)
    run_id = log_training_run(client, ckpt, "vision", "reg-vision-errors")
    name, v = tracking.register_checkpoint(run_id, "checkpoint", "vision", name="test-reg-vision")
    m = mlflow.pyfunc.load_model(f"models:/{name}/{v}")
    paths = write_inputs(tmp_path / "in", "vision")
    with pytest.raises(MlflowException, match=r"output='nope': expected one of \['pooled', 'states'\]"):
        m.predict([str(paths[0])], params={"output": "nope"})
    with pytest.raises(MlflowException, match="model_input is empty"):
        m.predict([])
    with pytest.raises(MlflowException, match=r"1 of 3 vision inputs.*\[1\] no such image file '/nope.png'"):
        m.predict([str(paths[0]), "/nope.png", str(paths[2])])
    assert m.predict([str(p) for p in paths]).shape == (3, 64)


def test_same_weights_of_the_same_run_register_once(client, tmp_path):
    from workers import tracking

    name = "test-reg-once"
    ckpt = make_checkpoint(tmp_path / "a", "audio", seed=7)
    run_id = log_training_run(client, ckpt, "audio", "reg-once")
    _, v1 = tracking.register_checkpoint(run_id, "checkpoint", "audio", name=name)
    _, again = tracking.register_checkpoint(run_id, "checkpoint", "audio", name=name, local_dir=ckpt)
    assert again == v1 and versions(client, name) == [v1]
    other_run = log_training_run(client, ckpt, "audio", "reg-once-other-run")  # same weights, another run
    _, v2 = tracking.register_checkpoint(other_run, "checkpoint", "audio", name=name)
    trained_more = make_checkpoint(tmp_path / "b", "audio", seed=8, step=9)  # same run, new weights
    _, v3 = tracking.register_checkpoint(run_id, "checkpoint", "audio", name=name, local_dir=trained_more)
    assert versions(client, name) == [v1, v2, v3] and len({v1, v2, v3}) == 3
    assert client.get_model_version(name, v3).tags["step"] == "9"


def test_finishing_a_finished_pretrain_again_registers_no_new_version(client, tmp_path):
    """`d2v pretrain` under a finished run's name ends in `_finish` with the same final checkpoint again."""
    from workers import tracking
    from workers.pretrain import DataInfo, _finish

    ckpt = make_checkpoint(tmp_path / "step_00000007", "vision", seed=9, step=7)
    c = tracking.client()
    run = c.create_run(tracking.experiment_id("test-registry-finish"), run_name="finish-twice",
                       tags={"d2v.run_name": "finish-twice", "git_commit": "abc1234"})

    @contextmanager
    def as_directory():
        yield str(ckpt)

    result = SimpleNamespace(metrics={"step": 7}, error=None,
                             checkpoint=SimpleNamespace(path=str(ckpt), as_directory=as_directory))
    info = DataInfo(tmp_path, [], 10, "fp-finish", None)
    cfg = load_encoder(ckpt)[0]
    before = set(versions(client, "data2vec-vision")) if _exists(client, "data2vec-vision") else set()
    first = _finish(cfg, result, run.info.run_id, "finish-twice", "vision", info, True)
    second = _finish(cfg, result, run.info.run_id, "finish-twice", "vision", info, True)
    assert second["version"] == first["version"] and second["model"] == "models:/data2vec-vision@candidate"
    assert set(versions(client, "data2vec-vision")) - before == {first["version"]}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    tags = client.get_model_version("data2vec-vision", first["version"]).tags
    assert (tags["step"], tags["data_fingerprint"], tags["git_commit"], tags["preset"]) == ("7", "fp-finish", "abc1234",
                                                                                          "vision-tiny")
    assert {"checkpoint"} <= {a.path for a in client.list_artifacts(run.info.run_id)}  # the full checkpoint stays


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def test_old_format_versions_still_resolve_and_embed_the_same(client, tmp_path):
    """A version registered before pyfunc models (source = the raw checkpoint dir) and a new one of the same
    weights give identical `d2v embed` output; a non-d2v MLflow Model fails with how to re-register."""
    from workers import tracking
    from workers.registry import ModelNotFound, resolve_model

    name = "test-reg-old"
    ckpt = make_checkpoint(tmp_path / "ckpt", "audio", seed=10)
    run_id = log_training_run(client, ckpt, "audio", "reg-old")
    client.create_registered_model(name)
    old = client.create_model_version(name, source=f"runs:/{run_id}/checkpoint", run_id=run_id).version
    _, new = tracking.register_checkpoint(run_id, "checkpoint", "audio", name=name)
    assert (resolve_model(f"models:/{name}/{old}") / "teacher.safetensors").is_file()  # the raw checkpoint
    paths = write_inputs(tmp_path / "in", "audio")
    a = embed_reference(f"models:/{name}/{old}", paths, tmp_path / "old.npz")
    b = embed_reference(f"models:/{name}/{new}", paths, tmp_path / "new.npz")
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)

    empty = tmp_path / "not-d2v"
    empty.mkdir()
    (empty / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(ModelNotFound, match="re-register"):
        resolve_model(empty)
