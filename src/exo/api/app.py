"""FastAPI application factory."""

import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from exo.api.context import ApiContext
from exo.shared.types.events import ProbeEmitted

MAX_EVENTS_PER_PAGE = 10_000


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(title="exo", description="Heterogeneous-GPU cluster runtime")

    @app.get("/node_id")
    async def get_node_id() -> dict[str, str]:
        return {"node_id": context.node_id}

    @app.get("/state")
    async def get_state() -> JSONResponse:
        return JSONResponse(context.store.state.model_dump(mode="json"))

    @app.get("/events")
    async def get_events(
        since: Annotated[int, Query(ge=-1, description="return events with index > since")] = -1,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PER_PAGE)] = 1000,
    ) -> dict[str, Any]:
        store = context.store
        events = store.events_between(since + 1, since + limit)
        return {
            "last_event_idx": store.last_idx,
            "events": [
                {
                    "idx": indexed.idx,
                    "applied_at": store.applied_at(indexed.idx),
                    "event": indexed.event.model_dump(mode="json"),
                }
                for indexed in events
            ],
        }

    @app.post("/probe", status_code=202)
    async def post_probe() -> dict[str, str | float]:
        """Emit a no-op event from this node's worker (propagation benchmarks)."""
        probe = ProbeEmitted(probe_id=str(uuid.uuid4()), sent_at=time.time())
        await context.sender.emit(probe)
        return {"probe_id": probe.probe_id, "event_id": probe.event_id, "sent_at": probe.sent_at}

    return app
