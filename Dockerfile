# syntax=docker/dockerfile:1
#
# LGT-ETL project image: the official Airflow image + the `lgt_ops` package (installed as a
# wheel, non-editable: it carries its prompts, sample and lineage SQL), the DAGs and the
# plugins. One image serves every role:
#   - Airflow components (api-server, scheduler, dag-processor, triggerer, workers),
#   - the one-shot jobs (`lgt db upgrade`, `lgt store init`, `airflow pools set`),
#   - the OpenAI-compatible simulator (`lgt sim serve`).
#
# Build:   docker build -t lgt-etl:local .
# Rules followed (https://airflow.apache.org/docs/docker-stack/build.html):
#   - install Python packages as the `airflow` user, never as root;
#   - pin apache-airflow to the image's own version in the same `pip install` so that no
#     dependency can up- or downgrade Airflow;
#   - files owned by airflow:0 (group 0 keeps the image OpenShift / arbitrary-UID compatible).
FROM apache/airflow:3.3.2-python3.11

LABEL org.opencontainers.image.title="lgt-etl" \
      org.opencontainers.image.description="LGT-ETL: Airflow 3 pipeline turning images into vision-language reasoning training data" \
      org.opencontainers.image.licenses="Apache-2.0"

USER root
RUN mkdir -p /opt/lgt/src \
    && chown -R airflow:0 /opt/lgt \
    && chmod -R g+rwX /opt/lgt
USER airflow

# What the package is built from: metadata, constraints, the package and sql/ (setup.py copies
# sql/ into the package as lgt_ops/sql, so the installed package finds its migrations).
WORKDIR /opt/lgt/src
COPY --chown=airflow:0 pyproject.toml setup.py README.md ./
COPY --chown=airflow:0 constraints/py311.txt constraints/py311.txt
COPY --chown=airflow:0 lgt_ops/ lgt_ops/
COPY --chown=airflow:0 sql/ sql/

# ${AIRFLOW_VERSION} is set by the base image (3.3.2); the constraints file pins the same.
# [postgres]: the metadata DB driver set (asyncpg, psycopg) Airflow needs on Postgres;
# [celery]: the CeleryExecutor's provider, celery/kombu and the redis client at the project's
# pins (workers of compose's `celery` profile and of the Helm chart).
# `pip check` fails the build if the project's pins broke a package the base image ships
# (providers, FAB, ...) instead of letting that surface at run time. The last check imports
# the installed package from outside the source tree: prompts and migrations must be in it.
RUN pip install --no-cache-dir --constraint constraints/py311.txt \
        "apache-airflow[postgres,celery]==${AIRFLOW_VERSION}" ".[openlineage]" \
    && pip check \
    && command -v lgt > /dev/null \
    && cd / && python -c "from lgt_ops import prompts; from lgt_ops.db.migrate import discover; \
assert prompts.all_templates() and discover('postgresql'), 'package data missing'"

# DAGs and plugins last: they change most often.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/

WORKDIR /opt/airflow
# ENTRYPOINT and CMD stay the official image's (/usr/bin/dumb-init -- /entrypoint).
