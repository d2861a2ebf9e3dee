"""Shared fixtures: real Postgres, a real S3 API over HTTP (moto server), the simulator over
HTTP, and an isolated Airflow home. Nothing of our own storage or services is mocked."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lgt-tests-"))

# Airflow reads its configuration at import time: set it before anything imports Airflow.
os.environ.setdefault("AIRFLOW_HOME", str(_SESSION_TMP / "airflow"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = (
    f"sqlite:///{_SESSION_TMP / 'airflow' / 'airflow.db'}"
)
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ["LGT_DATA_DIR"] = str(_SESSION_TMP / "lgt")
os.environ["LGT_TASK_RETRIES"] = "0"  # a failing task fails the test now, not after backoffs
for _var in [v for v in os.environ if v.startswith(("LGT_VLM", "LGT_LLM", "LGT_REASONER"))]:
    del os.environ[_var]
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log

from tests.pg import admin as _admin  # noqa: E402
from tests.pg import database_url  # noqa: E402 - after the environment above


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Postgres ----------------------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    name = f"lgt_test_{uuid.uuid4().hex[:10]}"
    _admin(f"CREATE DATABASE {name}")
    yield database_url(name)
    from lgt_ops.db.repo import _META

    _META.clear()
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lineage.db'}"


# -- S3 over HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """A new empty bucket on the S3 server: s3://<bucket>."""
    import boto3

    bucket = f"lgt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


# -- the simulator -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def simulator_server():
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig

    sim = BackgroundSimulator(SimConfig(latency_ms=1.0)).start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(simulator_server):
    """The shared simulator, with default behaviour and zeroed counters for this test."""
    from lgt_ops.llm.simulator import SimConfig

    defaults = SimConfig(latency_ms=1.0)
    for name in SimConfig.model_fields:
        setattr(simulator_server.sim.cfg, name, getattr(defaults, name))
    simulator_server.sim.reset()
    return simulator_server


# -- settings ----------------------------------------------------------------------------------
def make_settings(
    database_url: str,
    store_url: str,
    sim_url: str | None = None,
    s3_endpoint: str | None = None,
    **method: object,
):
    from lgt_ops.config import settings_from_env

    env = {
        "LGT_DATA_DIR": str(_SESSION_TMP / "lgt"),
        "LGT_DATABASE_URL": database_url,
        "LGT_STORE_URL": store_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    if s3_endpoint:
        env["LGT_S3_ENDPOINT_URL"] = s3_endpoint
    if sim_url:
        for role in ("VLM", "LLM", "REASONER"):
            env[f"LGT_{role}_BASE_URL"] = sim_url
    settings = settings_from_env(env)
    return settings.with_method(**method) if method else settings


@pytest.fixture
def local_env(tmp_path: Path, sqlite_url: str, sim):
    """A StageEnv on SQLite + a local directory store + the simulator."""
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages.base import StageEnv

    settings = make_settings(sqlite_url, (tmp_path / "store").as_uri(), sim.base_url)
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    env.store.ensure_bucket()
    return env


@pytest.fixture
def pg_s3_env(pg_url: str, s3_url: str, s3_endpoint: str, sim):
    """A StageEnv on Postgres + the S3 server + the simulator."""
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages.base import StageEnv

    settings = make_settings(pg_url, s3_url, sim.base_url, s3_endpoint)
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    return env


# -- Airflow -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def airflow_db() -> str:
    """Airflow's metadata DB (SQLite), migrated once per session."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(home)
