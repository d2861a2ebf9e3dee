"""The environment a task works in: settings, the lineage database, the object store, and
the run it belongs to. Every layer above the database and the store takes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from lgt_ops.config import Settings
from lgt_ops.db.engine import make_engine, reaching
from lgt_ops.db.migrate import upgrade
from lgt_ops.db.repo import forget_schema
from lgt_ops.runctx import RunContext
from lgt_ops.storage import ObjectStore, open_store, store_from_settings

if TYPE_CHECKING:
    from lgt_ops.params import RunParams


@dataclass
class StageEnv:
    settings: Settings
    db: Engine
    store: ObjectStore
    run: RunContext
    show_progress: bool = True
    _stores: dict[str, ObjectStore] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, run: RunContext, *, migrate: bool = True) -> StageEnv:
        db = make_engine(settings.database_url)
        with reaching(db):
            if migrate and upgrade(db):
                forget_schema(db)
        return cls(settings=settings, db=db, store=store_from_settings(settings), run=run)

    def store_for(self, url: str) -> ObjectStore:
        """The store a source row lives in (the main store, or another bucket)."""
        if url == self.store.url:
            return self.store
        if url not in self._stores:
            self._stores[url] = open_store(url, self.settings)
        return self._stores[url]

    def with_run(self, run: RunContext) -> StageEnv:
        return StageEnv(self.settings, self.db, self.store, run, self.show_progress, self._stores)

    def with_settings(self, settings: Settings) -> StageEnv:
        """Same database and store, other method/endpoint settings (run parameters)."""
        return StageEnv(settings, self.db, self.store, self.run, self.show_progress, self._stores)

    def for_run(self, params: RunParams) -> StageEnv:
        """The run-scoped environment: this run's model, endpoint and method parameters
        applied to the settings. The CLI, the DAG's tasks, the demo and `release publish`
        all go through here, so they compute the same fingerprints."""
        return self.with_settings(params.apply(self.settings))


HBUCKETS = 2**31  # hbucket values are in [0, HBUCKETS), see lgt_ops.ids.hbucket


@dataclass(frozen=True)
class Shard:
    """Images whose hbucket falls in the index-th of `count` equal ranges of [0, 2**31).

    Stable across runs, and a range (not a modulo) so a shard is read through the hbucket
    index: the cost of visiting one shard grows with the shard, not with the corpus.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} out of range for {self.count} shards")

    @classmethod
    def parse(cls, value: Any) -> Shard:
        if isinstance(value, Shard):
            return value
        if isinstance(value, dict):
            return cls(int(value["index"]), int(value["count"]))
        index, _, count = str(value).partition("/")
        return cls(int(index), int(count or 1))

    def bounds(self) -> tuple[int, int]:
        """[low, high) of the hbucket values in this shard."""
        return self.index * HBUCKETS // self.count, (self.index + 1) * HBUCKETS // self.count

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
