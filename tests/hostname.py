"""Airflow's `[core] hostname_callable` for tests that run several workers on one machine.

A task instance records the hostname of the worker that ran it; on one machine every worker
would report the same name, so each test worker process is started with LGT_TEST_HOSTNAME set to
its own name (its Celery node name) and Airflow records that instead. Kept free of imports from
tests.conftest: Airflow imports this inside worker processes.
"""

from __future__ import annotations

import os
import socket


def from_env() -> str:
    return os.environ.get("LGT_TEST_HOSTNAME") or socket.getfqdn()
