"""Which failures an Airflow task retries: `fail_fast` turns every permanent failure of the
library into AirflowFailException (failed on this try, one line) and lets transient ones and
unexpected errors through (retried with backoff)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from lgt_ops import failures
from lgt_ops.airflow_adapter import fail_fast
from lgt_ops.config import ConfigError, settings_from_env
from lgt_ops.db.migrate import MigrationError
from lgt_ops.llm.errors import EndpointAuthError, EndpointDown
from lgt_ops.llm.preflight import PreflightFailed
from lgt_ops.params import ParamsError, RunParams
from lgt_ops.prompts import PromptError
from lgt_ops.release.errors import ReleaseExists, ReleaseNotFound, SimulatedOutputRefused
from lgt_ops.release.recovery import ReleaseBusy
from lgt_ops.stages.runner import StageIncomplete
from tests.conftest import free_port

pytestmark = pytest.mark.airflow


def _db_down() -> OperationalError:
    engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/lgt")
    with pytest.raises(OperationalError) as down, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return down.value


def _raise(exc: BaseException):
    @fail_fast
    def task_body() -> None:
        raise exc

    return task_body


def _raised_by(callable_) -> BaseException:
    @fail_fast
    def task_body() -> None:
        callable_()

    with pytest.raises(BaseException) as caught:
        task_body()
    return caught.value


PERMANENT = [
    ParamsError("parameter 'k_rollouts': 0 is less than the minimum of 1"),
    ConfigError("LGT_VLM_MAX_INFLIGHT must be an integer, got 'many'"),
    PreflightFailed("preflight: vlm endpoint http://x/v1: model 'm' does not take image input"),
    EndpointAuthError("llm endpoint http://x/v1 refused credentials (401); check LGT_LLM_API_KEY"),
    ReleaseExists("release lgt/v1 is already published"),
    SimulatedOutputRefused("the selected outputs were produced by the simulator"),
    ReleaseNotFound("no release lgt/v9"),
    PromptError("no prompt template named 'mcq'"),
    MigrationError("cannot find sql/migrations"),
    failures.StoreRefused("object store refused the request: NoSuchBucket"),
]
TRANSIENT = [
    EndpointDown("vlm endpoint http://x/v1 unreachable for more than 120s"),
    StageIncomplete("cot: 3 item(s) not finished because of endpoint failures"),
    ReleaseBusy("another publisher holds release name lgt"),
    failures.LineageDbUnreachable("lineage database unreachable"),
    failures.StoreUnreachable("object store unreachable"),
]


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_a_permanent_failure_fails_the_task_on_this_try_as_one_line(exc):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as failed:
        _raise(exc)()
    assert failed.value.__cause__ is exc
    assert str(failed.value) == exc.line() and "\n" not in str(failed.value)


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_a_transient_failure_is_raised_as_is_for_a_retry(exc):
    with pytest.raises(type(exc)) as raised:
        _raise(exc)()
    assert raised.value is exc


def test_an_unreachable_lineage_db_and_a_bug_are_retried():
    for exc in (_db_down(), KeyError("a bug")):
        with pytest.raises(type(exc)) as raised:
            _raise(exc)()
        assert raised.value is exc


@pytest.mark.parametrize(
    "conf",
    [
        {"k_rollout": 4},
        {"release_version": "v1", "stages": ["mcq"]},
        {"compose_operators": []},
        {"trace_min_chars": 900, "trace_max_chars": 300},
    ],
)
def test_bad_run_parameters_raised_in_a_task_are_not_retried(conf):
    from airflow.sdk.exceptions import AirflowFailException

    failed = _raised_by(lambda: RunParams.from_conf(conf))
    assert isinstance(failed, AirflowFailException) and isinstance(failed.__cause__, ParamsError)


def test_a_bad_method_setting_applied_in_a_task_is_not_retried():
    from airflow.sdk.exceptions import AirflowFailException

    settings = settings_from_env({})
    failed = _raised_by(lambda: settings.with_method(easy_at_least=0.1))
    assert isinstance(failed, AirflowFailException) and isinstance(failed.__cause__, ConfigError)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_inflight": "many"}, "max_inflight: Input should be a valid integer"),
        ({"max_inflight": 100_000}, "max_inflight: Input should be less than or equal to 4096"),
        ({"down_after_s": -1}, "down_after_s: Input should be greater than 0"),
    ],
)
def test_a_bad_endpoint_connection_extra_is_a_permanent_config_error(monkeypatch, extra, message):
    import json

    from airflow.sdk.exceptions import AirflowFailException

    from lgt_ops.airflow_adapter import settings_from_airflow

    conn = {"conn_type": "openai", "host": "http://vllm:8000/v1", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_LGT_VLM", json.dumps(conn))
    failed = _raised_by(settings_from_airflow)
    assert isinstance(failed, AirflowFailException), failed
    assert isinstance(failed.__cause__, ConfigError)
    assert str(failed).startswith("connection lgt_vlm: invalid extra: ") and message in str(failed)
    good = {**conn, "extra": {"max_inflight": "32"}}  # a string, as the UI stores it
    monkeypatch.setenv("AIRFLOW_CONN_LGT_VLM", json.dumps(good))
    assert settings_from_airflow().endpoints["vlm"].max_inflight == 32
