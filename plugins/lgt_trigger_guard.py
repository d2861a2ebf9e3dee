"""Airflow plugin: refuse an invalid trigger of the LGT DAGs at the API (HTTP 400 with the
library's message naming each parameter), before a run is created. See
lgt_ops/trigger_guard.py for what it checks and why authentication stays Airflow's."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from lgt_ops.trigger_guard import TriggerGuard


class LgtTriggerGuardPlugin(AirflowPlugin):
    name = "lgt_trigger_guard"
    fastapi_root_middlewares = [
        {"middleware": TriggerGuard, "args": [], "kwargs": {}, "name": "LGT trigger guard"}
    ]
