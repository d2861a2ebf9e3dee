"""Airflow plugin: the releases page inside the Airflow UI.

The page (lgt_ops.webapp) is a FastAPI app mounted in the API server at `/lgt`. The "LGT
releases" nav entry is an external view with a `url_route`, so the UI shows the page in its
own frame at `/plugin/lgt-releases`; the frame is same-origin, so the browser sends the UI's
`_token` cookie and the page authenticates with Airflow's own auth manager (see
lgt_ops.airflow_adapter.releases_page_guard). Data comes from the lgt_postgres and lgt_s3
connections, as the DAG's tasks see them.
"""

from __future__ import annotations

import threading
from typing import Any

from airflow.plugins_manager import AirflowPlugin

PAGE_PREFIX = "/lgt"


class LazyPageApp:
    """The page's ASGI app, built on its first request.

    Every Airflow process (scheduler, DAG processor, each task) imports plugins, but only the
    API server serves the page: building it there alone keeps the web stack and Airflow's API
    security module out of the other processes' start-up, and an error in it out of their way.
    """

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def build(self) -> Any:
        with self._lock:
            if self._app is None:
                from lgt_ops.airflow_adapter import (
                    login_url,
                    releases_page_guard,
                    settings_from_airflow,
                )
                from lgt_ops.webapp import create_app, env_opener

                guard = releases_page_guard()
                self._app = create_app(env_opener(settings_from_airflow), guard, login_url)
            return self._app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self._app is None:
            import anyio.to_thread

            await anyio.to_thread.run_sync(self.build)  # imports: keep the event loop free
        await self._app(scope, receive, send)


class LgtPlugin(AirflowPlugin):
    name = "lgt_etl"
    fastapi_apps = [{"app": LazyPageApp(), "url_prefix": PAGE_PREFIX, "name": "LGT-ETL releases"}]
    external_views = [
        {
            "name": "LGT releases",
            "href": f"{PAGE_PREFIX}/releases",
            "destination": "nav",
            "url_route": "lgt-releases",
        }
    ]
