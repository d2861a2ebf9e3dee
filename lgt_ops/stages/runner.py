"""The loop every model-calling stage shares.

A stage turns its pending inputs into `WorkItem`s (each with one or more requests) and
supplies `handle(item, outcomes) -> Rows`. The runner streams all requests through one
`RequestEngine`, gathers each item's outcomes, and commits handled items in small batches:
the item's outputs and rejections and its done-marker in one transaction, with any of its
ledger rows the journal has not written yet. The ledger's journal makes answers durable on
its own within a bounded delay (settings `ledger_journal_*`), so a kill between two batches
re-sends only the requests in flight and the last few unjournaled answers. An item whose
request failed for endpoint reasons gets no marker and stays pending; the stage then raises
`StageIncomplete` so the orchestrator retries it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from lgt_ops.failures import EXIT_INCOMPLETE, TransientFailure
from lgt_ops.images import data_url, encode_for_request
from lgt_ops.llm.engine import RequestEngine
from lgt_ops.llm.ledger import JournalPolicy, Ledger
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.progress import Progress
from lgt_ops.registry import Stage, stage_fingerprint
from lgt_ops.stages.base import (
    ItemCommitter,
    Rejecter,
    Rows,
    Shard,
    StageEnv,
    StageStats,
    commit,
    count_rejections,
    recorded,
    rejection,
)
from lgt_ops.storage import S3Store


class StageIncomplete(TransientFailure, RuntimeError):
    """Some items could not be finished (endpoint failures); a retry resumes from them."""

    exit_code = EXIT_INCOMPLETE


C = TypeVar("C")


@dataclass
class WorkItem(Generic[C]):
    """One item a stage plans: its id (the done-marker's key), its image, its requests and
    the stage's own correlation data (`context`: a Question, an ImageContext, ...), which
    handle() gets back with the outcomes."""

    item_id: str
    image_id: str | None
    requests: list[ChatRequest]
    context: C | None = None


@dataclass
class Plan:
    """A stage's pending work on one shard, before any call is made."""

    items: list[WorkItem] = field(default_factory=list)
    considered: int = 0
    skipped: int = 0  # done under this fingerprint already
    early: Rows = field(default_factory=lambda: Rows())  # rejected without a call
    images: StoreImageUrls | None = None

    @property
    def requests(self) -> int:
        return sum(len(i.requests) for i in self.items)


class StoreImageUrls:
    """image_id -> what the VLM receives, per the settings' image spec."""

    def __init__(self, env: StageEnv, locations: dict[str, tuple[str, str]]) -> None:
        self.env = env
        self.locations = locations
        self.spec = env.settings.image_spec

    def url_for(self, image_id: str) -> str:
        store_url, key = self.locations[image_id]
        store = self.env.store_for(store_url)
        if self.spec.transport == "presigned_url" and isinstance(store, S3Store):
            return store.presigned_url(key)
        return data_url(encode_for_request(store.get(key), self.spec), self.spec)


def replica_checks(env: StageEnv, stage: str, role: str) -> dict[str, Any]:
    """What the replica pool checks before a replica gets work: the stage's largest request
    must fit its context, and replicas the run's preflight found down are probed in first."""
    from lgt_ops import registry
    from lgt_ops.llm import preflight

    need = registry.get(stage).needs(env.settings)
    rows = preflight.stored(env.db, env.run.run_id)
    down = [r["endpoint"] for r in rows if r["role"] == role and r["status"] == "down"]
    return {"needed_tokens": need.tokens if need else None, "unchecked": down}


def run_model_stage(
    env: StageEnv,
    *,
    stage: str,
    fingerprint: str,
    role: str,
    items: Sequence[WorkItem],
    handle: Callable[[WorkItem, list[Outcome]], Rows],
    stats: StageStats,
    images: StoreImageUrls | None = None,
) -> None:
    if not items:
        return
    s = env.settings
    policy = JournalPolicy(s.ledger_journal_seconds, s.ledger_journal_answers)
    ledger = Ledger(env.db, env.run, stage, env.store, journal=policy)
    total = sum(len(i.requests) for i in items)
    progress = Progress(f"{stage} [{role}]", total, enabled=env.show_progress)
    engine = RequestEngine(
        s.endpoint(role),
        ledger,
        images,
        progress=progress,
        seed=s.method.seed,
        **replica_checks(env, stage, role),
    )
    gathered = Gathered(items)
    committer = ItemCommitter(env, stage, fingerprint, stats, ledger)
    failed: list[str] = []

    def finish(item: WorkItem, outcomes: list[Outcome]) -> None:
        if any(o.status == "failed" for o in outcomes):
            failed.append(item.item_id)
            return
        committer.finish(item.item_id, handle(item, outcomes))

    requests = (req for item in items for req in item.requests)
    try:
        for item in items:
            if not item.requests:  # nothing to ask (e.g. no composable pair): done as is
                finish(item, [])
        for outcome in engine.run(requests):
            for item, outcomes in gathered.add(outcome):
                finish(item, outcomes)
            committer.flush_if_due()  # also commits answered requests of unfinished items
    finally:
        try:
            committer.flush()  # keep what is finished, also when the endpoint went down
        finally:
            ledger.close()
            progress.close()
            stats.absorb(engine.summary())
    if failed:
        raise StageIncomplete(
            f"{stage}: {len(failed)} item(s) not finished because of endpoint failures "
            f"({dict(engine.stats.errors)}); re-run to resume (finished work is kept)"
        )


class Gathered:
    """Each item's outcomes as they arrive, in any order; an item is complete once every
    one of its requests has its outcome."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self.by_key: dict[str, list[WorkItem]] = {}
        for item in items:
            for req in item.requests:
                self.by_key.setdefault(req.key, []).append(item)
        self.waiting = {id(i): len(i.requests) for i in items}
        self.got: dict[int, list[Outcome]] = {id(i): [] for i in items}

    def add(self, outcome: Outcome) -> list[tuple[WorkItem, list[Outcome]]]:
        """Record one outcome; the items it completes, with all their outcomes."""
        complete = []
        for item in self.by_key.get(outcome.request.key, ()):
            if outcome.request is not _match(item, outcome.request):
                continue
            self.got[id(item)].append(outcome)
            self.waiting[id(item)] -= 1
            if self.waiting[id(item)] == 0:
                complete.append((item, self.got.pop(id(item))))
        return complete


def run_planned(
    env: StageEnv,
    shard: Shard,
    *,
    stage: str,
    fingerprint: str,
    role: str | None,
    plan: Callable[[], Plan],
    handle: Callable[[WorkItem, list[Outcome]], Rows],
) -> StageStats:
    """A model stage on one shard: record the attempt, plan, commit early rejections, call."""
    with recorded(env, stage, shard, fingerprint) as stats:
        work = plan()
        stats.items_in, stats.items_skipped = work.considered, work.skipped
        record_early(env, work, stats)
        if role is None:  # a rule stage: the same items and commits, no requests
            run_rule_stage(env, stage, fingerprint, work.items, handle, stats)
            return stats
        run_model_stage(
            env,
            stage=stage,
            fingerprint=fingerprint,
            role=role,
            items=work.items,
            handle=handle,
            stats=stats,
            images=work.images,
        )
    return stats


def run_rule_stage(
    env: StageEnv,
    stage: str,
    fingerprint: str,
    items: Sequence[WorkItem],
    handle: Callable[[WorkItem, list[Outcome]], Rows],
    stats: StageStats,
) -> None:
    committer = ItemCommitter(env, stage, fingerprint, stats)
    for item in items:
        committer.finish(item.item_id, handle(item, []))
        committer.flush_if_due()
    committer.flush()


def run_stage(
    stage: type[Stage], env: StageEnv, spec: Any, shard: Shard, sample_size: int | None = None
) -> StageStats:
    """A registry stage on one shard: its plan() and handle() through `run_planned`."""
    fp = stage_fingerprint(stage.name, env.settings)
    return run_planned(
        env,
        shard,
        stage=stage.name,
        fingerprint=fp,
        role=stage.role,
        plan=lambda: stage.plan(env, spec, shard, sample_size),
        handle=lambda item, outcomes: stage.handle(env, fp, item, outcomes),
    )


def runner_for(stage: type[Stage]) -> Callable[..., StageStats]:
    """`run(env, spec, shard, sample_size=None)` for one stage (its module's entry point)."""
    return partial(run_stage, stage)


def _match(item: WorkItem, req: ChatRequest) -> ChatRequest | None:
    """The item's own request object for this outcome (identity, not key, so two items
    asking the same request each get their outcome)."""
    return next((r for r in item.requests if r is req), None)


def record_early(env: StageEnv, work: Plan, stats: StageStats) -> None:
    """Commit rejections decided before any call (e.g. an input with nothing to work on)."""
    rejected = work.early.tables.get("rejections", [])
    if not rejected:
        return
    commit(env, work.early.tables)
    count_rejections(stats, rejected)


def one_answer(
    env: StageEnv, stage: str, fp: str, item: WorkItem, outcomes: list[Outcome]
) -> tuple[Outcome, Rows, Rejecter]:
    """For a one-request item: its outcome, its rows (holding the request's rejection if it
    ended without usable output) and a Rejecter bound to the item and the request."""
    (outcome,) = outcomes
    rows = Rows()
    if not outcome.ok:
        rows.add("rejections", request_rejection(env, stage, fp, item, outcome))
    return outcome, rows, Rejecter(env, stage, fp, item.image_id, outcome.request.key)


def request_rejection(
    env: StageEnv, stage: str, fp: str, item: WorkItem, outcome: Outcome
) -> dict[str, Any]:
    """A rejection row for a request that ended without usable output."""
    return rejection(
        env,
        stage,
        fp,
        "request",
        item.item_id,
        outcome.error_class or outcome.status,
        outcome.error_detail,
        image_id=item.image_id,
        request_key=outcome.request.key,
    )
