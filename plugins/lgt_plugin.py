"""Airflow plugin: the lineage database's releases, served by the Airflow API server.

Adds `/lgt/releases` (JSON: every published release with its counts) and
`/lgt/releases/{name}/{version}` (its manifest and lineage summary), and a "LGT releases" link
in the Airflow UI navigation. Reads LGT_DATABASE_URL (set in compose and Helm).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from lgt_ops.webapp import create_app


class LgtPlugin(AirflowPlugin):
    name = "lgt_etl"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/lgt", "name": "LGT-ETL releases"}]
    external_views = [
        {"name": "LGT releases", "href": "/lgt/releases", "destination": "nav", "url_route": None}
    ]
