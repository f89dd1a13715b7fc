"""Which MLflow tracking URI a training run uses, and whether it can: the embedded default,
and the checks that fail in seconds, before any training, with a message saying what to do.

    uri = resolve_tracking_uri(cfg.mlflow_tracking_uri)  # flag > MLFLOW_TRACKING_URI > embedded
    check_tracking(uri, multi_node=num_nodes > 1)         # raises TrackingError

The embedded default is a SQLite store with its artifacts beside it, in one place per user so that
`ray job submit` runs land together; browse it with
    mlflow ui --backend-store-uri sqlite:///$HOME/.densenet_ray/mlflow/mlflow.db
"""

import contextlib
import json
import os
import socket
import sqlite3
import threading
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from pathlib import Path

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_SERVER_HINT = ("run a tracking server on the head node, e.g. `mlflow server --host 0.0.0.0 "
                "--port 5000 --backend-store-uri sqlite:///$HOME/.densenet_ray/mlflow/mlflow.db`, "
                "and pass --mlflow-tracking-uri http://HEAD_IP:5000")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which URI, what failed, what works."""


def mlflow_home() -> Path:
    """~/.densenet_ray/mlflow, or $DENSENET_RAY_HOME/mlflow: mlflow.db and artifacts/."""
    return Path(os.environ.get("DENSENET_RAY_HOME", "~/.densenet_ray")).expanduser() / "mlflow"


def resolve_tracking_uri(flag: str | None = None) -> str:
    """The flag, else $MLFLOW_TRACKING_URI, else the embedded SQLite store (its folder created)."""
    if flag:
        return flag
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = mlflow_home()
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for anything else)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    if uri == path or not path or path == ":memory:":
        raise TrackingError(f"tracking URI {uri!r}: expected sqlite:///relative/path.db or "
                            "sqlite:////absolute/path.db (a file, not an in-memory database)")
    return Path(path)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a SQLite store
    (MLflow would otherwise use ./mlruns of whatever directory the job runs in), else the
    store's or server's own default (None)."""
    db = _sqlite_path(uri)
    return (db.resolve().parent / "artifacts").as_uri() if db else None


def check_tracking(uri: str, *, timeout_s: float = 5.0, multi_node: bool = False) -> None:
    """Raise TrackingError within about `timeout_s` seconds unless `uri` can record runs.

    Accepted: http(s)://HOST:PORT of an MLflow tracking server (checked through /health and the
    REST API, with $MLFLOW_TRACKING_TOKEN or $MLFLOW_TRACKING_USERNAME/_PASSWORD when set);
    sqlite:///file.db and file:/folder or a plain folder (checked for write access) on a single
    node only, since workers on other nodes cannot reach them; postgresql, mysql, mssql and
    databricks URIs are passed to MLflow unchecked.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0] if len(parsed.scheme) > 1 else ""  # C:\ is a path
    local = scheme in ("", "file", "sqlite")
    if multi_node and (local or parsed.hostname in _LOCAL_HOSTS):
        where = "a file on this node" if local else f"{parsed.hostname}, i.e. each node itself"
        raise TrackingError(f"tracking URI {uri!r} is {where}: the workers on the other nodes "
                            f"of this cluster cannot reach it. For a multi-node cluster, "
                            f"{_SERVER_HINT}.")
    if scheme in ("http", "https"):
        _within(timeout_s, uri, lambda: _check_server(uri, timeout_s))
    elif scheme == "sqlite":
        _check_sqlite(uri, _sqlite_path(uri), timeout_s)
    elif local:
        folder = Path(parsed.path if scheme == "file" else uri)
        _check_writable(uri, folder if folder.exists() else folder.parent)
    elif scheme not in ("postgresql", "mysql", "mssql", "databricks"):
        raise TrackingError(f"tracking URI {uri!r}: scheme {scheme!r} is not supported; use "
                            "http(s)://HOST:PORT of an `mlflow server`, sqlite:///path/mlflow.db, "
                            "or a postgresql/mysql/mssql/databricks URI")


def _within(timeout_s: float, uri: str, check) -> None:
    """Run `check` in a thread and give up after timeout_s (+1 s): urllib's timeout does not
    cover a DNS lookup that hangs."""
    errors: list[BaseException] = []

    def run():
        try:
            check()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True, name="check-tracking")
    thread.start()
    thread.join(timeout_s + 1)
    if thread.is_alive():
        raise TrackingError(f"tracking server {uri} did not answer within {timeout_s:g} s "
                            "(is the host name right and the server up?)")
    if errors:
        raise errors[0]


def _auth_headers() -> dict[str, str]:
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_server(uri: str, timeout_s: float) -> None:
    base = uri.rstrip("/")
    api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    for url, headers in ((f"{base}/health", {}), (api, _auth_headers())):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=timeout_s) as response:
                body = response.read(1 << 16)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise TrackingError(
                    f"tracking server {uri} refused the credentials (HTTP {e.code} from {url}); "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                    "MLFLOW_TRACKING_TOKEN") from None
            raise TrackingError(f"{uri} is not an MLflow tracking server: {url} answered "
                                f"HTTP {e.code}; start one with `mlflow server`") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                reason = f"no answer within {timeout_s:g} s"
            raise TrackingError(f"tracking server {uri} is unreachable ({reason}); start it with "
                                "`mlflow server --host 0.0.0.0 --port PORT` or fix "
                                "--mlflow-tracking-uri / MLFLOW_TRACKING_URI") from None
        if url.endswith("/health") and body.strip() != b"OK":
            raise TrackingError(f"{uri} is not an MLflow tracking server: {url} answered "
                                f"{body[:80]!r} instead of 'OK'")
    try:
        json.loads(body)
    except ValueError:
        raise TrackingError(f"{uri} is not an MLflow tracking server: {api} did not answer "
                            "JSON") from None


def _check_writable(uri: str, folder: Path) -> None:
    while not folder.exists():  # MLflow creates missing folders: check the first existing one
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise TrackingError(f"tracking URI {uri!r}: {folder} is not a writable folder; pick a "
                            "path you can write to, or unset it to use the embedded store in "
                            f"{mlflow_home()}")


def _check_sqlite(uri: str, db: Path, timeout_s: float) -> None:
    if not db.exists():
        _check_writable(uri, db.parent)
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True,
                                                timeout=timeout_s)) as con:
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as e:
        raise TrackingError(f"tracking URI {uri!r}: cannot open {db} as a SQLite database "
                            f"({e}); point it to an MLflow database or a new file") from None


@contextlib.contextmanager
def temporary_env(**values: str | None):
    """Set (None: unset) environment variables until the block ends: MLflow reads several of
    its settings from the environment at each call, with no per-client equivalent."""
    saved = {k: os.environ.get(k) for k in values}
    _set_env(values)
    try:
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
