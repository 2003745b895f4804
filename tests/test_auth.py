"""Security basics: the MLflow server in infra/mlflow runs MLflow's basic-auth app with its admin password from
a Secret / .env; nothing in d2v turns Ray's token authentication off.

The live check is in tests/test_failures.py (test_driver_killed_torn_checkpoints_tracking_away_then_register):
a whole `d2v pretrain` (driver, Ray Train workers, `d2v register`) against an auth-enabled `mlflow server` on
loopback with the credentials only in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; an unauthenticated
request is refused (401) and d2v without the password fails naming the variables; the password is then looked
for, and not found, in the run's params, tags, every artifact, the checkpoints and the run's logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

from tests.mlflow_servers import ADMIN, MlflowServer

ROOT = Path(__file__).resolve().parent.parent


# the variable (or Ray's system-config key) followed closely by "disabled", on one line or a manifest's next line
_DISABLES_RAY_AUTH = re.compile(r"(?:RAY_AUTH_MODE|auth_mode)[\s\S]{0,40}?\bdisabled\b", re.IGNORECASE)


def test_nothing_in_d2v_disables_ray_token_auth():
    """Ray (2.60 here) turns token authentication on for a cluster `ray.init()` starts unless RAY_AUTH_MODE says
    otherwise (ray/_private/authentication/authentication_token_setup.py: enable_token_auth_by_default), and
    `ray start` clusters use it with RAY_AUTH_MODE=token (tests/test_pretrain.py runs d2v against one). d2v's
    code, Makefile and manifests never set it to anything else."""
    files = [p for d in ("workers", "pipelines", "model", "infra") for p in (ROOT / d).rglob("*") if p.is_file()
             and p.suffix in (".py", ".yaml", ".yml", ".toml", ".sh", ".env", ".example", "", ".ini")]
    files += [ROOT / "Makefile", ROOT / "pyproject.toml"]
    assert len(files) > 50
    offenders = [str(p) for p in files if _DISABLES_RAY_AUTH.search(p.read_text(errors="replace"))]
    assert not offenders
    for text in ('env = {"RAY_AUTH_MODE": "disabled"}', "export RAY_AUTH_MODE=disabled",
                 "- name: RAY_AUTH_MODE\n  value: disabled", "ray.init(_system_config={'auth_mode': 'disabled'})"):
        assert _DISABLES_RAY_AUTH.search(text), text  # the pattern catches the ways it could be written


def _server_commands(path: str) -> list[tuple[list[str], dict]]:
    """(argv, env) of every `mlflow server` in a compose file or Kubernetes manifest."""
    out = []
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        for svc in (doc.get("services") or {}).values():
            out.append(([str(a) for a in svc.get("command") or []], svc.get("environment") or {}))
        for c in (((doc.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers", []):
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
            out.append(([str(a) for a in c.get("command", []) + c.get("args", [])], env))
    return [(argv, env) for argv, env in out if argv[:2] == ["mlflow", "server"]]


@pytest.mark.parametrize("path", ["infra/mlflow/docker-compose.yaml", "infra/mlflow/docker-compose.team.yaml",
                                  "infra/mlflow/mlflow-k8s.yaml"])
def test_infra_mlflow_server_runs_the_basic_auth_app_with_a_secret_admin_password(path):
    """Parsed by `mlflow server`'s own option parser (nothing started); the admin password comes from a Secret or
    the .env file, never a literal in the repository."""
    from mlflow.cli import server

    servers = _server_commands(path)
    assert servers, f"{path}: no mlflow server found"
    for argv, env in servers:
        assert server.make_context("server", argv[2:]).params["app_name"] == "basic-auth", argv
        pw = env.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        assert isinstance(pw, dict) or str(pw).startswith("${MLFLOW_ADMIN_PASSWORD:?"), pw
        assert env.get("MLFLOW_AUTH_CONFIG_PATH") == "/etc/mlflow/basic_auth.ini"
    ini = (ROOT / "infra/mlflow/basic_auth.ini").read_text()
    assert "admin_password" not in ini.replace("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    assert "COPY basic_auth.ini /etc/mlflow/basic_auth.ini" in (ROOT / "infra/mlflow/Dockerfile").read_text()
