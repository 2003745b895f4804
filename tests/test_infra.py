"""infra/: the cluster, MLflow and image files parse, agree with each other, and agree with the code.

Fast and offline: no network, no docker, no Kubernetes. What is checked against the real thing here:
the RayJob entrypoint against d2v's own CLI parser, the cluster-launcher YAML against Ray's autoscaler
JSON schema, the MLflow server commands against `mlflow server`'s own option parser (and its Host-header
check against the URIs the Ray nodes use), the image's requirements against pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
RAYCLUSTER = INFRA / "ray" / "raycluster.yaml"
RAYJOB = INFRA / "ray" / "rayjob.yaml"
LAUNCHER = INFRA / "ray" / "cluster-launcher.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
COMPOSE_TEAM = INFRA / "mlflow" / "docker-compose.team.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "mlflow-k8s.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
IMAGE_REQUIREMENTS = INFRA / "docker" / "requirements.txt"


# ------------------------------------------------------------------------------------------ helpers
def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, found {len(docs)}"
    return docs[0]


def doc_of_kind(path: Path, kind: str, name: str | None = None) -> dict:
    found = [d for d in load_docs(path) if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{path}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) for the standalone RayCluster and the RayJob's embedded cluster."""
    return [
        ("raycluster.yaml", load_one(RAYCLUSTER)["spec"]),
        ("rayjob.yaml", load_one(RAYJOB)["spec"]["rayClusterSpec"]),
    ]


def pod_containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "pod template without containers"
    return containers


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e["name"] == name:
            return e.get("value")
    return None


def cpu_quantity(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


_COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def compose_interpolate(value):
    """docker compose interpolation with an empty environment: ${X:-default} -> default, $$ -> $."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return m.group(2) or ""

        return _COMPOSE_VAR.sub(sub, value)
    if isinstance(value, list):
        return [compose_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: compose_interpolate(v) for k, v in value.items()}
    return value


def compose_services(path: Path) -> dict:
    return compose_interpolate(load_one(path))["services"]


def as_argv(command) -> list[str]:
    return [str(a) for a in command] if isinstance(command, list) else shlex.split(command)


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def mlflow_server_args(monkeypatch_module):
    """Parse an `mlflow server ...` argv with MLflow's own click command (nothing is started)."""
    from mlflow.cli import server

    def parse(argv: list[str], env: dict[str, str]) -> dict:
        assert argv[:2] == ["mlflow", "server"], f"not an mlflow server command: {argv}"
        for key in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
            monkeypatch_module.delenv(key, raising=False)
        for k, v in env.items():
            monkeypatch_module.setenv(k, v)
        try:
            return server.make_context("server", list(argv[2:])).params
        finally:
            for k in env:
                monkeypatch_module.delenv(k, raising=False)

    return parse


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def host_allowed(allowed_hosts: str | None, host: str) -> bool:
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    patterns = [h.strip() for h in allowed_hosts.split(",")] if allowed_hosts else get_default_allowed_hosts()
    return is_allowed_host_header(patterns, host)


@pytest.fixture(scope="module")
def mlflow_service() -> dict:
    """The in-cluster MLflow endpoint defined by infra/mlflow/mlflow-k8s.yaml."""
    svc = doc_of_kind(MLFLOW_K8S, "Service", "mlflow")
    dep = doc_of_kind(MLFLOW_K8S, "Deployment", "mlflow")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items()), "Service selects no MLflow pod"
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = [p for p in svc["spec"]["ports"]]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    target = port.get("targetPort", port["port"])
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    container_port = ports[target] if isinstance(target, str) else target
    assert container_port in ports.values(), f"targetPort {target} is not a container port"
    return {"name": svc["metadata"]["name"], "port": port["port"], "container_port": container_port,
            "container": container}


# -------------------------------------------------------------------------------------------- YAML
def test_every_infra_yaml_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert {RAYCLUSTER, RAYJOB, LAUNCHER, COMPOSE, COMPOSE_TEAM, MLFLOW_K8S} <= set(files)
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc, dict), f"{path}: a document that is not a mapping"


# ----------------------------------------------------------------------------------------- KubeRay
def test_kuberay_kinds():
    rc, rj = load_one(RAYCLUSTER), load_one(RAYJOB)
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    for doc in (rc, rj):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_head_group_schedules_nothing(label, spec):
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), f"{label}: KubeRay rayStartParams must be strings"
    assert params.get("num-cpus") == "0", f"{label}: the head must not take training or data tasks"
    assert params.get("dashboard-host") == "0.0.0.0"
    (container,) = pod_containers(head)
    ports = {p["containerPort"] for p in container.get("ports", [])}
    assert {6379, 8265, 10001} <= ports, f"{label}: head ports {ports}"
    for section in ("limits", "requests"):
        assert "nvidia.com/gpu" not in (container.get("resources", {}).get(section) or {}), f"{label}: GPU on head"
    assert "num-gpus" not in params or params["num-gpus"] == "0"


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_gpu_worker_group(label, spec):
    groups = spec["workerGroupSpecs"]
    assert groups, f"{label}: no worker group"
    gpu_groups = 0
    for g in groups:
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{label}: rayStartParams must be strings"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{label}/{g['groupName']}: replicas"
        (container,) = pod_containers(g)
        res = container["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        if gpus is None:
            continue
        gpu_groups += 1
        assert int(gpus) >= 1
        assert int(params["num-gpus"]) == int(gpus), (
            f"{label}/{g['groupName']}: rayStartParams num-gpus {params['num-gpus']} != nvidia.com/gpu limit {gpus}")
        if "nvidia.com/gpu" in (res.get("requests") or {}):
            assert int(res["requests"]["nvidia.com/gpu"]) == int(gpus), "GPU requests must equal limits"
        assert cpu_quantity(res["limits"]["cpu"]) >= 2, "a Train worker reserves 1 CPU; leave room for loading"
        # Ray's object store and DataLoader workers need a real /dev/shm (the container default is 64 MB)
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        shm = [v for v in g["template"]["spec"]["volumes"] if mounts.get(v["name"]) == "/dev/shm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", f"{label}: no memory-backed /dev/shm"
    assert gpu_groups, f"{label}: no worker group requests nvidia.com/gpu"


def test_one_image_everywhere():
    images = set()
    for _, spec in ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            images |= {c["image"] for c in pod_containers(group)}
    docker = load_one(LAUNCHER)["docker"]
    images |= {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert images == {"d2v:latest"}, f"images differ across infra files: {images}"
    readme = (INFRA / "README.md").read_text()
    assert "docker build -f infra/docker/Dockerfile -t d2v:latest ." in readme


def test_ray_version_matches_the_image():
    args = dockerfile_args()
    for label, spec in ray_cluster_specs():
        assert spec["rayVersion"] == args["RAY_VERSION"], f"{label}: rayVersion != the image's Ray"
    ray_req = next(r for r in pyproject_requirements() if canonicalize_name(r.name) == "ray")
    assert ray_req.specifier.contains(args["RAY_VERSION"]), "the image's Ray does not satisfy pyproject"


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_tracking_uri_is_the_mlflow_service(label, spec, mlflow_service):
    uris = []
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in pod_containers(group):
            uri = env_value(c, "MLFLOW_TRACKING_URI")
            assert uri, f"{label}: container {c['name']} has no MLFLOW_TRACKING_URI"
            uris.append(uri)
    if label == "rayjob.yaml":
        runtime_env = yaml.safe_load(load_one(RAYJOB)["spec"]["runtimeEnvYAML"])
        uris.append(runtime_env["env_vars"]["MLFLOW_TRACKING_URI"])
    for uri in uris:
        u = urlparse(uri)
        assert u.scheme == "http"
        labels = u.hostname.split(".")
        assert labels[0] == mlflow_service["name"], f"{uri} does not name the Service {mlflow_service['name']}"
        assert len(labels) == 1 or (len(labels) >= 3 and labels[2] == "svc"), f"{uri}: expected <svc> or <svc>.<ns>.svc[.cluster.local]"
        assert u.port == mlflow_service["port"], f"{uri}: port != Service port {mlflow_service['port']}"


@pytest.mark.parametrize("label,spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_ray_pod_authenticates_to_mlflow_from_the_secret(label, spec, mlflow_service, monkeypatch):
    """The MLflow server runs the basic-auth app; every Ray pod (the head runs the drivers that own the run,
    the workers' rank 0 logs metrics) gets MLflow's standard credential variables: the user the server
    bootstraps (its auth config, as MLflow's own reader parses it) and the password from the same Secret key
    the server takes its admin password from. No literal password anywhere, not in the job's runtime_env."""
    from mlflow.server.auth.config import read_auth_config

    server_env = {e["name"]: e for e in mlflow_service["container"]["env"]}
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    admin = read_auth_config().admin_username
    server_secret = server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert admin and server_secret.get("optional") is not True
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in pod_containers(group):
            env = {e["name"]: e for e in c.get("env") or []}
            assert env.get("MLFLOW_TRACKING_USERNAME", {}).get("value") == admin, f"{label}/{c['name']}: user"
            password = env.get("MLFLOW_TRACKING_PASSWORD", {})
            assert "value" not in password, f"{label}/{c['name']}: a literal password"
            ref = password.get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": server_secret["name"], "key": server_secret["key"]}, f"{label}/{c['name']}: {ref}"
    if label == "rayjob.yaml":  # job runtime_env is stored in Ray's job table: no credentials there
        runtime_env = yaml.safe_load(load_one(RAYJOB)["spec"]["runtimeEnvYAML"])
        assert not {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} & set(runtime_env["env_vars"])


def test_mlflow_k8s_server(mlflow_service, mlflow_server_args):
    c = mlflow_service["container"]
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    params = mlflow_server_args(as_argv(c["command"] + c.get("args", [])), env)
    assert params["host"] == "0.0.0.0"
    assert params["port"] == mlflow_service["container_port"]
    assert params["serve_artifacts"]
    mount_paths = [m["mountPath"] for m in c["volumeMounts"]]
    store = params["backend_store_uri"]
    if store.startswith("sqlite:"):
        db = store.removeprefix("sqlite:///")
        assert db.startswith("/") and any(db.startswith(m + "/") for m in mount_paths), "sqlite db not on the volume"
    # the Host header Ray nodes send (http://mlflow:5000) must pass MLflow's DNS-rebinding check
    for host in (f"{mlflow_service['name']}:{mlflow_service['port']}",
                 f"{mlflow_service['name']}.default.svc.cluster.local:{mlflow_service['port']}",
                 f"127.0.0.1:{mlflow_service['port']}"):
        assert host_allowed(params["allowed_hosts"], host), f"mlflow server would reject Host: {host}"


def test_rayjob_runs_pretrain_with_the_real_cli(capsys):
    spec = load_one(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and all(isinstance(v, str) for v in runtime_env["env_vars"].values())

    entrypoint = spec["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["d2v", "pretrain"], f"entrypoint must start with `d2v pretrain`: {entrypoint}"
    from workers.cli import build_parser

    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"d2v's CLI rejects the RayJob entrypoint {entrypoint!r}:\n{capsys.readouterr().err}")
    assert args.command == "pretrain"
    assert args.modality in ("vision", "audio", "text")
    assert args.data.startswith(("s3://", "gs://")), "cluster jobs read shards from shared object storage"

    # the worker group can host the requested Train workers (a worker's GPUs live in one pod)
    (group,) = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    per_pod = int(group["rayStartParams"]["num-gpus"])
    capacity = per_pod * group["maxReplicas"]
    assert args.gpus_per_worker <= per_pod
    assert args.workers * args.gpus_per_worker <= capacity, (
        f"{args.workers} workers x {args.gpus_per_worker} GPU > {capacity} GPUs in the RayJob's cluster")


# ---------------------------------------------------------------------------------- cluster launcher
def test_cluster_launcher_is_valid_for_ray():
    cfg = load_one(LAUNCHER)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in cfg, f"cluster-launcher.yaml lacks {key}"
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type advertises GPUs"
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t.get("min_workers", 0) <= t.get("max_workers", cfg["max_workers"]) <= cfg["max_workers"]
    assert cfg.get("setup_commands", []) == [], "the image carries everything; no per-node installs"
    assert not cfg.get("file_mounts")

    # Ray's own schema for this file (ray/autoscaler/ray-schema.json; read without importing ray)
    from tests.conftest import require

    jsonschema = require("jsonschema", "validates the cluster launcher against Ray's own schema")
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    import json

    jsonschema.validate(cfg, json.loads(schema_path.read_text()))


def test_cluster_launcher_tracking_uri_is_accepted_by_the_team_server(mlflow_server_args):
    opts = " ".join(load_one(LAUNCHER)["docker"].get("run_options", []))
    m = re.search(r"(?:-e|--env)[ =]MLFLOW_TRACKING_URI=(\S+)", opts)
    assert m, "the launcher's containers get no MLFLOW_TRACKING_URI"
    u = urlparse(m.group(1))
    mlflow = compose_services(COMPOSE_TEAM)["mlflow"]
    params = mlflow_server_args(as_argv(mlflow["command"]), compose_env(mlflow))
    assert host_allowed(params["allowed_hosts"], u.netloc), f"the team server would reject Host: {u.netloc}"


# --------------------------------------------------------------------------------------- compose
def test_compose_sqlite(mlflow_server_args):
    services = compose_services(COMPOSE)
    assert "mlflow" in services
    svc = services["mlflow"]
    params = mlflow_server_args(as_argv(svc["command"]), compose_env(svc))
    store = params["backend_store_uri"]
    assert store.startswith("sqlite:////"), f"sqlite store must be an absolute path: {store}"
    volumes = [v.split(":")[1] for v in svc["volumes"]]
    assert any(store.removeprefix("sqlite:///").startswith(v + "/") for v in volumes), "db not on a volume"
    assert any(params["artifacts_destination"].startswith(v + "/") for v in volumes), "artifacts not on a volume"
    assert params["serve_artifacts"] and params["host"] == "0.0.0.0" and params["port"] == 5000
    assert any(str(p).endswith(":5000") for p in svc["ports"])
    for host in ("localhost:5000", "127.0.0.1:5000", "mlflow:5000", "10.0.0.7:5000"):
        assert host_allowed(params["allowed_hosts"], host), f"mlflow server would reject Host: {host}"


def test_compose_team(mlflow_server_args):
    services = compose_services(COMPOSE_TEAM)
    assert {"postgres", "minio", "mlflow"} <= services.keys()
    svc = services["mlflow"]
    env = compose_env(svc)
    params = mlflow_server_args(as_argv(svc["command"]), env)

    store = urlparse(params["backend_store_uri"])
    assert store.scheme.startswith("postgresql"), params["backend_store_uri"]
    assert store.hostname == "postgres" and store.path == "/" + compose_env(services["postgres"])["POSTGRES_DB"]
    assert store.username == compose_env(services["postgres"])["POSTGRES_USER"]
    assert store.password == compose_env(services["postgres"])["POSTGRES_PASSWORD"]

    dest = urlparse(params["artifacts_destination"])
    assert dest.scheme == "s3" and params["serve_artifacts"]
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    minio_env = compose_env(services["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]

    # some service creates the bucket before mlflow starts
    creators = [n for n, s in services.items() if re.search(rf"mc mb\b.*/{dest.hostname}\b", str(s.get("command")))]
    assert creators, f"nothing creates the bucket {dest.hostname}"
    depends = svc["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends[creators[0]]["condition"] == "service_completed_successfully"
    assert params["host"] == "0.0.0.0" and params["port"] == 5000


def test_mlflow_server_image_has_the_drivers():
    reqs = {canonicalize_name(Requirement(line).name): Requirement(line) for line in requirement_lines(
        INFRA / "mlflow" / "requirements.txt")}
    assert {"mlflow", "psycopg2-binary", "boto3"} <= reqs.keys()
    client = next(r for r in pyproject_requirements() if canonicalize_name(r.name) == "mlflow")
    pinned = next(iter(reqs["mlflow"].specifier)).version
    assert client.specifier.contains(pinned), "server MLflow outside the clients' range"


# ---------------------------------------------------------------------------------------- Docker
def requirement_lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def pyproject_requirements() -> list[Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [Requirement(d) for d in deps]


def normalized(req: Requirement) -> tuple:
    return (canonicalize_name(req.name), tuple(sorted(req.extras)), SpecifierSet(str(req.specifier)),
            str(req.marker or ""))


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM can use)."""
    args = {}
    for op, rest in dockerfile_instructions():
        if op == "FROM":
            break
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    return args


def test_image_requirements_equal_pyproject():
    image = [Requirement(line) for line in requirement_lines(IMAGE_REQUIREMENTS)]
    project = pyproject_requirements()
    assert len(image) == len({canonicalize_name(r.name) for r in image}), "duplicate names in requirements.txt"
    assert {normalized(r) for r in image} == {normalized(r) for r in project}, (
        "infra/docker/requirements.txt drifted from pyproject.toml [project].dependencies")


def test_dockerfile():
    ins = dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms, "no FROM"
    args = dockerfile_args()
    base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], froms[-1].split()[0])
    m = re.search(r"py3(\d+)\b", base) or re.search(r"python:3\.(\d+)", base)
    assert m and int(m.group(1)) >= 11, f"base image {base} is not Python >= 3.11"
    assert re.search(r"cu\d+|gpu|cuda", base), f"base image {base} is not a CUDA image"

    runs = " ".join(rest for op, rest in ins if op == "RUN")
    apt = re.search(r"apt-get install[^&;]*", runs)
    assert apt and "espeak-ng" in apt.group(0) and "libsndfile1" in apt.group(0)
    assert "pip install -r infra/docker/requirements.txt" in runs
    assert re.search(r"pip install (--no-deps )?(-e )?\.(\s|$)", runs), "the project itself is not installed"

    # every COPY source exists in the build context (the repository root)
    for op, rest in ins:
        if op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the build context"


def test_dockerignore_keeps_what_the_build_needs():
    import fnmatch

    ignore = DOCKERFILE.parent / (DOCKERFILE.name + ".dockerignore")
    patterns = requirement_lines(ignore)
    needed = ["pyproject.toml", "README.md", "infra/docker/requirements.txt",
              "model/__init__.py", "pipelines/__init__.py", "workers/cli.py"]
    for path in needed:
        for pat in patterns:
            pat = pat.removeprefix("**/")
            hit = fnmatch.fnmatch(path, pat) or path.startswith(pat.rstrip("/") + "/")
            assert not hit, f"{ignore.name} excludes {path} (pattern {pat})"
    assert {".venv", "data", ".git"} <= set(patterns), "large local directories are sent to the builder"


def test_readme_covers_every_piece():
    text = (INFRA / "README.md").read_text()
    for needle in ("infra/ray/raycluster.yaml", "infra/ray/rayjob.yaml", "ray up infra/ray/cluster-launcher.yaml",
                   "docker-compose.yaml", "docker-compose.team.yaml", "mlflow-k8s.yaml", "RAY_ADDRESS=",
                   "make pretrain", ".dockerignore", "s3://"):
        assert needle in text, f"infra/README.md does not mention {needle}"
