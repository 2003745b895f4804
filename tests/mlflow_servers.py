"""An `mlflow server` process a test owns: stopped and started again on the same port (a tracking blip), and
optionally with MLflow's basic-auth app (the way infra/mlflow runs it). Separate from the session server in
conftest.py, which other tests keep using while this one is down."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import NO_JOB_RUNNER, on_free_port, wait_for_start

ADMIN = "d2v-admin"


class MlflowServer:
    """sqlite backend + proxied artifacts under `root`; `auth=True`: basic-auth app, admin ADMIN / self.password."""

    def __init__(self, root: Path, auth: bool = False):
        self.root, self.auth = root, auth
        self.password = secrets.token_urlsafe(24) if auth else None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a d2v user sets: the tracking URI and, with auth, the standard MLflow credential variables."""
        env = {"MLFLOW_TRACKING_URI": self.uri}
        if self.auth:
            env.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=self.password)
        return env

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(NO_JOB_RUNNER)
        if self.auth:
            ini = self.root / "basic_auth.ini"
            ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                           f"database_uri = sqlite:///{self.root}/basic_auth.db\nadmin_username = {ADMIN}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        return env

    def _start_on(self, port: int) -> subprocess.Popen | None:
        self._starts += 1
        log = self.root / f"server-{self._starts}.log"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=self._server_env())
        if wait_for_start(proc, log, rf"Uvicorn running on http://127\.0\.0\.1:{port}\b", r"address already in use",
                          "mlflow server"):
            return proc
        proc.kill()
        proc.wait()
        return None

    def start(self) -> MlflowServer:
        """First start: a free port; later starts: the same port again (clients keep their URI)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port, self.proc = on_free_port(self._start_on, "mlflow server")
        else:
            self.proc = self._start_on(self.port)
            assert self.proc is not None, f"port {self.port} was taken while the mlflow server was stopped"
        with urllib.request.urlopen(f"{self.uri}/health", timeout=10) as r:
            assert r.status == 200
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
