"""``cellatlas-server``: the MLflow tracking server of the README's cluster recipe, secure by default.

MLflow's own basic-auth app, not a reverse proxy: it installs with the pipeline (no nginx to
configure on a login node), gives every user an account, and keeps per-experiment permissions
(the creator manages an experiment, others may only read it). Without credentials nothing can be
read or written, artifacts included (HTTP 401). The server listens on 127.0.0.1 unless ``--host``
says otherwise. Basic auth sends the password with every request: across an untrusted network,
put TLS in front (README).

    cellatlas-server --dir /project/me/mlflow [--host 0.0.0.0] [--port 5000]
        [--backend-store-uri postgresql://...]
    cellatlas-server add-user alice --tracking-uri http://login01:5000   # as admin

The admin's password is ``MLFLOW_AUTH_ADMIN_PASSWORD`` when set, else made up once and written
to ``<dir>/admin-password`` (readable by you only). Jobs authenticate with
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` from their environment; nothing
writes them into the config, the runs or the logs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

ADMIN = "admin"


def _private_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def job_runner_env() -> dict[str, str]:
    """MLflow's job runner off unless the user turned it on.

    It serves MLflow's GenAI features (trace scoring and archival, prompt optimization), not run
    tracking, and starts seven worker processes that each import MLflow: on a 2-core host a fresh
    server's requests took 3-5 s each instead of 0.4 s, and a login node's users lose the CPU.
    """
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}


def prepare(folder: Path, *, auth_db_uri: str | None = None) -> tuple[Path, dict[str, str]]:
    """Write the auth config into ``folder``; returns it and the environment the server needs."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    auth_db = auth_db_uri or f"sqlite:///{(folder / 'auth.db').resolve()}"
    ini = folder / "auth.ini"
    # READ: a signed-in colleague may look at your runs but not change them; anonymous: nothing
    _private_file(ini, "[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {auth_db}\nadmin_username = {ADMIN}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "grant_default_workspace_access = false\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()), **job_runner_env()}
    # signs the UI's forms against cross-site requests; the same across restarts and workers
    key = folder / "flask-secret"
    if not key.exists():
        _private_file(key, secrets.token_hex(32) + "\n")
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
                   or key.read_text().strip())
    if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        secret = folder / "admin-password"
        if not secret.exists():
            _private_file(secret, secrets.token_urlsafe(24) + "\n")
            print(f"cellatlas-server: the admin password is in {secret} (readable by you only)", file=sys.stderr)
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = secret.read_text().strip()
    return ini, env


def server_command(args: argparse.Namespace) -> list[str]:
    folder = Path(args.dir).resolve()
    backend = args.backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
    artifacts = args.artifacts_destination or str(folder / "artifacts")
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", args.host,
           "--port", str(args.port), "--backend-store-uri", backend, "--artifacts-destination", artifacts,
           "--workers", str(args.workers)]
    allowed = args.allowed_hosts
    if allowed is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        # MLflow refuses Host headers it does not know; the names jobs use for this host are these
        names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
        allowed = ",".join(f"{n}:{args.port}" for n in sorted(names))
    if allowed:
        cmd += ["--allowed-hosts", allowed]
    return cmd


def add_user(name: str, tracking_uri: str) -> None:
    import getpass

    from mlflow.server import get_app_client

    password = os.environ.get("CELLATLAS_NEW_PASSWORD") or getpass.getpass(f"password for {name}: ")
    get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(username=name, password=password)
    print(f"cellatlas-server: user {name} created; their jobs set MLFLOW_TRACKING_USERNAME={name} and "
          "MLFLOW_TRACKING_PASSWORD", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["add-user"]:
        p = argparse.ArgumentParser(prog="cellatlas-server add-user",
                                    description="Create a user (run with the admin's MLFLOW_TRACKING_USERNAME/PASSWORD).")
        p.add_argument("name")
        p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
        a = p.parse_args(argv[1:])
        add_user(a.name, a.tracking_uri)
        return
    p = argparse.ArgumentParser(prog="cellatlas-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="mlflow-server", help="the server's own folder: auth config and database, "
                   "admin password, and (by default) the run store and artifacts")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this host only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", help="default: SQLite in --dir; PostgreSQL for a cluster")
    p.add_argument("--artifacts-destination", help="default: --dir/artifacts")
    p.add_argument("--auth-db-uri", help="the users' database (default: SQLite in --dir)")
    p.add_argument("--allowed-hosts", help="Host headers MLflow accepts (default: this host's names)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    _, env = prepare(Path(args.dir), auth_db_uri=args.auth_db_uri)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"cellatlas-server: listening on {args.host}:{args.port}; passwords travel unencrypted over plain "
              "HTTP, so beyond a trusted network put TLS in front (README)", file=sys.stderr)
    cmd = server_command(args)
    os.execve(cmd[0], cmd, {**os.environ, **env})


if __name__ == "__main__":
    main()
