"""Annotate: ask the VLM for a dense caption and object boxes where the metadata has none.

Only what is missing is asked for and stored: a caption from the manifest is never replaced
by a model's. Boxes come back in the pixel coordinates of the image as sent (it may have been
shrunk to the image spec's max side); they are scaled back to the original upright image,
validated, and recorded with the model and request that produced them.
"""

from __future__ import annotations

from lgt_ops import boxes, prompts, registry
from lgt_ops.annotations import ImageContext, current
from lgt_ops.ids import content_id
from lgt_ops.images import scale_factor
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest, image_part
from lgt_ops.llm.schema import parse_json_reply
from lgt_ops.reasons import IngestReason, Rejected, ReplyReason
from lgt_ops.sources import SourceSpec, image_locations, image_set
from lgt_ops.stages.base import Shard, StageEnv, already_done
from lgt_ops.stages.manifest_rows import annotation_row
from lgt_ops.stages.outcomes import one_answer
from lgt_ops.stages.requests import stage_request
from lgt_ops.stages.runner import (
    Plan,
    Rows,
    StoreImageUrls,
    WorkItem,
    runner_for,
)

SPEC = registry.Annotate  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
MAX_TOKENS = registry.Annotate.reply_tokens
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint


def item_id(ctx: ImageContext) -> str:
    return content_id("annotate-input", ctx.image_id, ctx.caption_id, ctx.objects_id)


def build_request(env: StageEnv, ctx: ImageContext) -> ChatRequest:
    t = prompts.load(TEMPLATE)
    scale = scale_factor(ctx.width, ctx.height, env.settings.image_spec)
    messages = t.render(
        width=round(ctx.width * scale),
        height=round(ctx.height * scale),
        max_objects=env.settings.method.annotate_max_objects,
    )
    user = messages[-1]
    messages[-1] = {
        "role": "user",
        "content": [image_part(ctx.image_id), {"type": "text", "text": user["content"]}],
    }
    seed = int(ctx.image_id[:8], 16) % (2**31)
    return stage_request(
        env, SPEC, messages, {"temperature": 0.2, "max_tokens": MAX_TOKENS, "seed": seed}
    )


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    ctx: ImageContext = item.context
    outcome, rows, reject = one_answer(env, STAGE, fp, item, outcomes)
    if not outcome.ok:
        return rows
    model = env.settings.endpoint("vlm").model
    try:
        reply = parse_json_reply(outcome.contents()[0])
        caption, raw_objects = str(reply["caption"]).strip(), list(reply["objects"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        rows.add(
            "rejections",
            reject("request", item.item_id, Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc))),
        )
        return rows
    key = outcome.request.key
    if ctx.caption is None and caption:
        rows.add(
            "annotations",
            annotation_row(
                env, ctx.image_id, "caption", "model", model, {"caption": caption}, fp, key
            ),
        )
        rows.outputs += 1
    if ctx.objects is None:
        scale = scale_factor(ctx.width, ctx.height, env.settings.image_spec)
        objects = []
        for n, obj in enumerate(raw_objects[: env.settings.method.annotate_max_objects], start=1):
            oid = f"m{n}"
            try:
                label = str(obj.get("label", "")).strip().lower()
                if not label:
                    raise Rejected(IngestReason.OBJECT_LABEL_MISSING, f"object {obj!r}"[:200])
                sent = boxes.to_xyxy(obj.get("box"), "xyxy", ctx.width, ctx.height)
                box = boxes.validate([v / scale for v in sent], ctx.width, ctx.height)
            except Rejected as exc:
                rows.add("rejections", reject("object", f"{item.item_id}#{oid}", exc))
                continue
            objects.append({"id": oid, "label": label, "box": list(box)})
        if objects:
            content = {"objects": objects, "source_box_format": "xyxy", "scale": scale}
            rows.add(
                "annotations",
                annotation_row(env, ctx.image_id, "objects", "model", model, content, fp, key),
            )
            rows.outputs += 1
    return rows


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = current(conn, images)  # metadata only: what is missing?
        needy = [c for c in contexts.values() if c.caption is None or c.objects is None]
        done = already_done(conn, STAGE, fp, [item_id(c) for c in needy])
        locations = image_locations(conn, [c.image_id for c in needy])
    out = Plan(considered=len(needy), images=StoreImageUrls(env, locations))
    for ctx in needy:
        if item_id(ctx) in done:
            out.skipped += 1
        else:
            out.items.append(WorkItem(item_id(ctx), ctx.image_id, [build_request(env, ctx)], ctx))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Annotate)
