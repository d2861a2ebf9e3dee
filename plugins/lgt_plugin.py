"""Airflow plugin: the releases page inside the Airflow UI.

The page (lgt_ops.webapp) is a FastAPI app mounted in the API server at `/lgt`. The "LGT
releases" nav entry is an external view with a `url_route`, so the UI shows the page in its
own frame at `/plugin/lgt-releases`; the frame is same-origin, so the browser sends the UI's
`_token` cookie and the page authenticates with Airflow's own auth manager (see
lgt_ops.airflow_adapter.releases_page_guard). Data comes from the lgt_postgres and lgt_s3
connections, as the DAG's tasks see them.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from lgt_ops.airflow_adapter import login_url, releases_page_guard, settings_from_airflow
from lgt_ops.webapp import create_app, env_opener

PAGE_PREFIX = "/lgt"


class LgtPlugin(AirflowPlugin):
    name = "lgt_etl"
    fastapi_apps = [
        {
            "app": create_app(env_opener(settings_from_airflow), releases_page_guard(), login_url),
            "url_prefix": PAGE_PREFIX,
            "name": "LGT-ETL releases",
        }
    ]
    external_views = [
        {
            "name": "LGT releases",
            "href": f"{PAGE_PREFIX}/releases",
            "destination": "nav",
            "url_route": "lgt-releases",
        }
    ]
