"""The dashboard: ``GET /`` (a page shipped in the package, no build step, no CDN) and the
live stream it reads, ``GET /state/stream``.

The stream is server-sent events (``text/event-stream``). On connect it sends an ``event:
state`` frame whose ``data`` is :func:`dashboard_view` of this node's state; then one more
each time the store changes and the view differs from the last one sent, at most one every
:data:`MIN_INTERVAL_S` (changes in between are folded into the next frame). A comment line
(``: keep-alive``) goes out after :data:`KEEPALIVE_S` without a frame, so proxies and
browsers keep the connection. The response ends when the client disconnects: a listener on
the ASGI ``receive`` channel cancels the sender, and nothing outlives the request.
"""

import contextlib
import json
import math
from collections import Counter
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from exo.api.context import ApiContext
from exo.api.errors import detail_response
from exo.shared.event_store import EventStore
from exo.shared.runner_sets import instance_health
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

MIN_INTERVAL_S = 0.25
"""At most four state frames a second per client."""
KEEPALIVE_S = 15.0
"""A comment line after this long without a frame."""
RETRY_MS = 2000
"""Reconnection delay suggested to EventSource clients."""

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def dashboard_view(state: State, node_id: NodeId) -> dict[str, Any]:
    """What the page shows: the state without its tasks (counted by status instead) and
    with each instance's health (``ready``, ``loading``, ``healing``, ``failed`` and why)."""
    task_counts = Counter(task.status for task in state.tasks.values())
    return {
        "node_id": node_id,
        "master_node_id": state.master_node_id,
        "last_event_applied_idx": state.last_event_applied_idx,
        "members": sorted(state.members),
        "nodes": {key: node.model_dump(mode="json") for key, node in state.nodes.items()},
        "gpu_device_info": {
            node: {device: info.model_dump(mode="json") for device, info in infos.items()}
            for node, infos in state.gpu_device_info.items()
        },
        "gpu_device_state": {
            node: {device: reading.model_dump(mode="json") for device, reading in readings.items()}
            for node, readings in state.gpu_device_state.items()
        },
        "instances": {
            key: instance.model_dump(mode="json") for key, instance in state.instances.items()
        },
        "instance_health": {
            key: dict(zip(("status", "reason"), instance_health(state, instance), strict=True))
            for key, instance in state.instances.items()
        },
        "runners": {key: runner.model_dump(mode="json") for key, runner in state.runners.items()},
        "tasks": {"total": len(state.tasks), **dict(sorted(task_counts.items()))},
    }


async def state_frames(
    store: EventStore,
    node_id: NodeId,
    min_interval_s: float = MIN_INTERVAL_S,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncGenerator[str]:
    """The stream's frames, forever: the view now, then the view after each change (when
    it differs), coalesced to one every ``min_interval_s``; a keep-alive comment after
    ``keepalive_s`` without a write."""
    yield f"retry: {RETRY_MS}\n\n"
    last_body: str | None = None
    last_sent_at = -math.inf
    last_write_at = anyio.current_time()
    while True:
        # Taken before reading the state, so a change while we send is not missed.
        changed = store.changed
        body = json.dumps(dashboard_view(store.state, node_id), separators=(",", ":"))
        if body != last_body:
            last_body = body
            last_sent_at = last_write_at = anyio.current_time()
            yield f"event: state\ndata: {body}\n\n"
        with anyio.move_on_after(last_write_at + keepalive_s - anyio.current_time()) as waited:
            await changed.wait()
        if waited.cancelled_caught:
            last_write_at = anyio.current_time()
            yield ": keep-alive\n\n"
            continue
        delay = last_sent_at + min_interval_s - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop when the client disconnects, whatever the ASGI spec
    version (Starlette's own response only notices on a failed write with 2.4+)."""

    def __init__(self, frames: AsyncGenerator[str]) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    try:
                        async for frame in self._frames:
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": frame.encode(),
                                    "more_body": True,
                                }
                            )
                    except OSError:
                        pass  # the client went away mid-write
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(pump)
                group.start_soon(watch)
        except anyio.get_cancelled_exc_class():
            # The server is going away with the client still connected (the node stops and
            # its loop cancels the open requests): the stream just ends, nothing to report.
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            with anyio.CancelScope(shield=True):
                await self._frames.aclose()


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once (only these names are served)."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            files[path.name] = (path.read_bytes(), content_type)
    return files


def dashboard_routes(context: ApiContext) -> APIRouter:
    router = APIRouter()
    files = _static_files()
    no_cache = {"cache-control": "no-cache"}

    @router.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(files["index.html"][0], headers=no_cache)

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        found = files.get(name)
        if found is None:
            return detail_response(404, "no such file")
        return Response(found[0], media_type=found[1], headers=no_cache)

    @router.get("/state/stream", response_class=EventStreamResponse)
    async def state_stream() -> EventStreamResponse:
        """The dashboard's view of the state as server-sent events: on connect, then on
        every change (at most 4 a second), with a keep-alive comment every 15 s."""
        return EventStreamResponse(state_frames(context.store, context.node_id))

    return router
