"""Every expected failure of the `lgt` command, through the real CLI (a subprocess) against
real services in the failing state: one line on stderr naming what failed and what to do,
the documented exit code (README "Failures and exit codes"), and no traceback without -v."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from lgt_ops import failures
from lgt_ops.storage import S3Store
from tests.conftest import ROOT, free_port
from tests.samples import upload_sample

pytestmark = [pytest.mark.postgres, pytest.mark.s3]


@pytest.fixture
def cli_env(tmp_path: Path, pg_url: str, s3_url: str, s3_endpoint: str, sim) -> dict[str, str]:
    """Environment of a working `lgt`: Postgres, the S3 server and the simulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LGT_")}
    env.update(
        PYTHONPATH=str(ROOT),
        LGT_DATA_DIR=str(tmp_path / "lgt"),
        LGT_DATABASE_URL=pg_url,
        LGT_STORE_URL=s3_url,
        LGT_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for role in ("VLM", "LLM", "REASONER"):
        env[f"LGT_{role}_BASE_URL"] = sim.base_url
    return env


def lgt(env: dict[str, str], *args: str, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lgt_ops.cli", *args],
        env={**env, **overrides},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(ROOT),
    )


def one_line(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The failure's one stderr line; asserts the exit code, the words and no traceback."""
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and " INFO lgt_ops.progress: " not in line  # progress, off a terminal
    ]
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("lgt: ")
    for needle in needles:
        assert needle in line, line
    return line


def test_parameters_lineage_db_and_store_failures(cli_env):
    dead = f"127.0.0.1:{free_port()}"

    one_line(lgt(cli_env, "run", "--k-rollouts", "0"), failures.EXIT_USAGE, "k_rollouts")
    one_line(
        lgt(cli_env, "run", "--stages", "mcq", "--release-version", "v1"),
        failures.EXIT_USAGE,
        "release_version",
        "'release' stage is not selected",
    )
    one_line(
        lgt(cli_env, "ingest", LGT_VLM_MAX_INFLIGHT="many"),
        failures.EXIT_USAGE,
        "LGT_VLM_MAX_INFLIGHT must be an integer",
    )

    # Settings no retry can fix: one line naming the setting, exit 2, no password echoed.
    for bad_db in ("not a url", "postgresql+nodriver://lgt:s3cret@db/lgt"):
        line = one_line(
            lgt(cli_env, "ingest", LGT_DATABASE_URL=bad_db),
            failures.EXIT_USAGE,
            "lineage database URL not usable",
            "LGT_DATABASE_URL",
        )
        assert "s3cret" not in line
    one_line(
        lgt(cli_env, "ingest", LGT_S3_ENDPOINT_URL="not-a-url"),
        failures.EXIT_USAGE,
        "object store endpoint 'not-a-url' is not usable",
        "LGT_S3_ENDPOINT_URL",
    )

    down_db = f"postgresql+psycopg2://postgres@{dead}/lgt"
    for args in (("db", "upgrade"), ("ingest", "--source", "sources/")):
        one_line(
            lgt(cli_env, *args, LGT_DATABASE_URL=down_db),
            failures.EXIT_LINEAGE_DB,
            "lineage database unreachable",
            dead,
            "LGT_DATABASE_URL",
        )

    one_line(
        lgt(cli_env, "ingest", "--source", "sources/", LGT_S3_ENDPOINT_URL=f"http://{dead}"),
        failures.EXIT_STORE,
        "object store unreachable",
        dead,
        "LGT_S3_ENDPOINT_URL",
    )
    one_line(
        lgt(cli_env, "ingest", "--source", "sources/", LGT_STORE_URL="s3://no-such-bucket-lgt"),
        failures.EXIT_STORE,
        "object store refused",
        "NoSuchBucket",
    )

    # -v: the same failure with its traceback, for a developer.
    verbose = lgt(cli_env, "-v", "db", "upgrade", LGT_DATABASE_URL=down_db)
    assert verbose.returncode == failures.EXIT_LINEAGE_DB
    assert "Traceback" in verbose.stderr


def test_endpoint_and_release_failures(cli_env, s3_url, s3_endpoint, pg_url, sim):
    store = S3Store(s3_url.removeprefix("s3://"), endpoint_url=s3_endpoint)
    upload_sample(store, "sources/sample/")
    src = ("--source", "sources/sample/")
    assert lgt(cli_env, "ingest", *src).returncode == 0

    # The LLM endpoint is down (nobody listening): a transient failure, named, exit 5.
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    one_line(
        lgt(cli_env, "mcq", *src, LGT_LLM_BASE_URL=dead_url, LGT_LLM_DOWN_AFTER_S="1"),
        failures.EXIT_ENDPOINT_DOWN,
        "llm endpoint",
        dead_url,
        "unreachable",
        "LGT_LLM_BASE_URL",
    )
    # ... refusing our credentials: permanent, exit 4.
    sim.sim.cfg.api_key = "the-right-key"
    one_line(
        lgt(cli_env, "mcq", *src, LGT_LLM_API_KEY="a-wrong-key"),
        failures.EXIT_ENDPOINT_AUTH,
        f"llm endpoint {sim.base_url} refused credentials",
        "LGT_LLM_API_KEY",
    )
    sim.sim.cfg.api_key = None

    for stage in ("annotate", "mcq", "blind"):
        done = lgt(cli_env, stage, *src)
        assert done.returncode == 0, done.stderr[-2000:]
    release = ("release", "publish", *src, "--release-name", "t", "--release-version", "v1")
    one_line(lgt(cli_env, *release), failures.EXIT_RELEASE, "t/v1", "simulator", "allow")
    assert lgt(cli_env, *release, "--allow-simulated").returncode == 0
    one_line(
        lgt(cli_env, *release, "--allow-simulated"),
        failures.EXIT_RELEASE,
        "t/v1 is already published",
    )
    one_line(lgt(cli_env, "release", "verify", "t/v9"), failures.EXIT_RELEASE, "t/v9", "manifest")
    one_line(lgt(cli_env, "release", "diff", "t/v1", "t/v9"), failures.EXIT_RELEASE, "t/v9")

    # Every CLI command that recorded a run closed it: nothing is left `running`.
    with create_engine(pg_url).connect() as conn:
        statuses = dict(
            conn.execute(text("SELECT status, COUNT(*) FROM pipeline_runs GROUP BY status")).all()
        )
        stage_statuses = set(conn.execute(text("SELECT status FROM stage_runs")).scalars())
        failed = (
            conn.execute(
                text(
                    "SELECT error_detail FROM stage_runs WHERE status = 'failed' AND stage = 'mcq'"
                )
            )
            .scalars()
            .all()
        )
    assert "running" not in statuses and statuses.get("failed", 0) >= 2
    assert "running" not in stage_statuses
    assert any("unreachable" in d for d in failed) and any("credentials" in d for d in failed)


def test_only_connection_errors_count_as_an_unreachable_database(sqlite_url):
    from sqlalchemy.exc import OperationalError

    from lgt_ops.db.engine import make_engine

    with pytest.raises(OperationalError) as bad_sql, make_engine(sqlite_url).connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert failures.describe(bad_sql.value) is None  # a bug, not an outage

    # The engine itself turns a refused connection into the library's error (with the
    # driver's error chained), so whoever catches it gets the one-line message.
    with pytest.raises(failures.LineageDbUnreachable) as down:
        make_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x").connect()
    assert "Connection refused" in str(down.value.__cause__)  # the driver's error, chained
    found = failures.describe(down.value)
    assert isinstance(found, failures.LineageDbUnreachable) and not found.permanent
    assert found.exit_code == failures.EXIT_LINEAGE_DB
