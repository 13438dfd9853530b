"""Operations endpoints of PROTOCOL section 7: liveness, readiness and Prometheus metrics; and the OpenAPI document
of every route (docs/openapi.json). No auth."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST

from chatserver import queries
from handlers.base import AppContext, JsonHandler

READINESS_TIMEOUT = 2.0


class HealthHandler(JsonHandler):
    def get(self) -> None:
        self.reply({"status": "ok"})

    head = get


class ReadyHandler(JsonHandler):
    """200 while the store answers and every registered part (the Chat3 listener) is usable; else 503."""

    async def get(self) -> None:
        problems: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.service.store.read(queries.ping), READINESS_TIMEOUT)
        except Exception as exc:
            problems["store"] = f"not usable: {exc or type(exc).__name__}"
        for name, check in self.ctx.readiness.items():
            problem = check()
            if problem:
                problems[name] = problem
        if self.ctx.shutting_down:
            problems["server"] = "shutting down"
        if problems:
            self.set_status(503)
            text = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
            self.finish({"success": False, "error": f"not ready: {text}", "data": problems})
            return
        self.reply({"status": "ready"})


class MetricsHandler(JsonHandler):
    async def get(self) -> None:
        body = await self.ctx.metrics.exposition()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


class OpenApiHandler(JsonHandler):
    """`GET /api/openapi.json`: docs/openapi.json as it is (no envelope), so that tools can read it."""

    def initialize(self, ctx: AppContext, document: bytes) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.document = document

    def get(self) -> None:
        self.finish(self.document)
