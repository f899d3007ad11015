"""FastAPI application factory."""

import time
import uuid
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import Field
from starlette.exceptions import HTTPException

from exo.api.chat import chat_routes
from exo.api.context import ApiContext
from exo.api.dashboard import dashboard_routes
from exo.api.errors import detail_response, is_openai_path, openai_error, path_error
from exo.api.metrics import install_metrics
from exo.api.node_view import node_view
from exo.api.validation import (
    MAX_ID_LENGTH,
    ApiRequest,
    PathId,
    describe_errors,
    error_code,
    error_parameter,
    refuse_unknown_query_parameters,
)
from exo.master.planning import plan_instance
from exo.shared.echo import echoed
from exo.shared.types.commands import (
    CommandResult,
    DeleteInstance,
    PlaceInstance,
    ReplaceInstance,
)
from exo.shared.types.events import InstanceCreated, InstanceReplacementStarted, ProbeEmitted
from exo.shared.types.ids import InstanceId
from exo.shared.types.instances import PlacementObjective, RebalancePolicy

MAX_EVENTS_PER_PAGE = 10_000
NO_INSTANCE_ID = "no instance id given: the path is /instance/{instance_id}"


class PlaceInstanceRequest(ApiRequest):
    model_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    min_nodes: int = Field(default=1, ge=1, le=1024)
    objective: PlacementObjective = "latency"
    rebalance: RebalancePolicy = "auto"
    allow_planning_only: bool = False
    """Place a planning-only card anyway (its runners fail at once: there are no weights);
    for placement experiments and tests."""


def error_response(result: CommandResult) -> JSONResponse:
    return detail_response(result.status_code, result.error or "request failed", **result.detail)


def create_app(context: ApiContext) -> FastAPI:
    # Every route refuses the query parameters it does not declare (a typo is an error,
    # not a silently different answer).
    app = FastAPI(
        title="exo",
        description="Heterogeneous-GPU cluster runtime",
        dependencies=[Depends(refuse_unknown_query_parameters)],
    )

    # Errors: on /v1 OpenAI's shape, {"error": {"message", "type", "param", "code"}}, a bad
    # request 400; elsewhere {"detail": "<reason>", ...}, a bad request 422.
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # The offending input is never echoed: a body can be megabytes.
        errors = error.errors()
        problems = describe_errors(errors)
        if is_openai_path(request.url.path):
            return openai_error(
                400,
                f"invalid request: {problems}",
                "invalid_request_error",
                code=error_code(errors),
                param=error_parameter(errors),
            )
        return detail_response(422, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        response = path_error(request.url.path, error.status_code, str(error.detail))
        for name, value in (error.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return path_error(request.url.path, 500, f"internal error: {type(error).__name__}")

    @app.get("/gpus")
    async def get_gpus() -> list[dict[str, Any]]:
        """Every device in the cluster: node, static facts and the live reading."""
        state = context.store.state
        devices: list[dict[str, Any]] = []
        for node_id, device_id, info, reading in state.devices():
            node = state.nodes.get(node_id)
            devices.append(
                {
                    "node_id": node_id,
                    "friendly_name": node.friendly_name if node is not None else None,
                    "device_id": device_id,
                    "info": info.model_dump(mode="json") if info is not None else None,
                    "state": reading.model_dump(mode="json") if reading is not None else None,
                }
            )
        return devices

    @app.get("/node_id")
    async def get_node_id() -> dict[str, str]:
        return {"node_id": context.node_id}

    @app.get("/state")
    async def get_state() -> JSONResponse:
        """The cluster state as this node applied it, and ``this_node``: its own role (a
        master that lost its majority says so) and how fresh its view is."""
        view = node_view(context)  # first: it takes note of a stall that just ended
        return JSONResponse(
            {**context.store.state.model_dump(mode="json"), "this_node": view.model_dump()}
        )

    @app.get("/events")
    async def get_events(
        since: Annotated[int, Query(ge=-1, description="return events with index > since")] = -1,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PER_PAGE)] = 1000,
    ) -> dict[str, Any]:
        """Up to ``limit`` events after ``since``. Events before ``first_kept_idx`` were
        compacted into the snapshot (``GET /snapshot``, the state after ``snapshot_idx``):
        a page asked for from before it starts at ``first_kept_idx`` and counts the events
        it skipped in ``compacted_skipped``."""
        store = context.store
        first_kept = store.base
        first = max(since + 1, first_kept)
        events = store.events_between(first, first + limit - 1)
        skipped = first - (since + 1)
        snapshot_idx = first_kept - 1 if first_kept > 0 else None
        return {
            "last_event_idx": store.last_idx,
            "first_kept_idx": first_kept,
            "snapshot_idx": snapshot_idx,
            "compacted_skipped": skipped,
            "note": (
                f"events {since + 1}..{first_kept - 1} were compacted into the snapshot at "
                f"event {snapshot_idx} (GET /snapshot; GET /state includes their effect); "
                f"the events held start at {first_kept}"
                if skipped
                else None
            ),
            "events": [
                {
                    "idx": indexed.idx,
                    "applied_at": store.applied_at(indexed.idx),
                    "event": indexed.event.model_dump(mode="json"),
                }
                for indexed in events
            ],
        }

    @app.get("/snapshot")
    async def get_snapshot() -> Response:
        """The state after event ``idx`` (``{"idx", "term", "state"}``) that the events
        before ``GET /events``' ``first_kept_idx`` were compacted into; 404 before the
        first compaction (the log then starts at event 0)."""
        snapshot = context.store.snapshot()
        if snapshot is None:
            return detail_response(
                404, "no snapshot: nothing was compacted, GET /events?since=-1 starts at event 0"
            )
        return Response(snapshot.model_dump_json(), media_type="application/json")

    @app.post("/probe", status_code=202)
    async def post_probe() -> dict[str, str | float]:
        """Emit a no-op event from this node's worker (propagation benchmarks)."""
        probe = ProbeEmitted(probe_id=str(uuid.uuid4()), sent_at=time.time())
        await context.sender.emit(probe)
        return {"probe_id": probe.probe_id, "event_id": probe.event_id, "sent_at": probe.sent_at}

    @app.post("/instance", status_code=201)
    async def post_instance(request: PlaceInstanceRequest) -> JSONResponse:
        command = PlaceInstance(
            model_id=request.model_id,
            min_nodes=request.min_nodes,
            objective=request.objective,
            rebalance=request.rebalance,
            allow_planning_only=request.allow_planning_only,
        )
        result = await context.send_command(command)
        if not result.ok:
            return error_response(result)
        created = context.store.event_at(result.event_indices[0])
        if created is None or not isinstance(created.event, InstanceCreated):
            return detail_response(500, "instance event missing")
        return JSONResponse(status_code=201, content=created.event.instance.model_dump(mode="json"))

    @app.get("/instance/placement")
    async def get_placement(
        model_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH)],
        min_nodes: Annotated[int, Query(ge=1, le=1024)] = 1,
        objective: PlacementObjective = "latency",
    ) -> JSONResponse:
        """Dry run: the placement this node would get now; nothing is created."""
        # In a thread, as the master decides commands: a first placement may import mlx-lm.
        outcome = await anyio.to_thread.run_sync(
            plan_instance,
            PlaceInstance(model_id=model_id, min_nodes=min_nodes, objective=objective),
            context.store.state,
        )
        if isinstance(outcome, CommandResult):
            return error_response(outcome)
        return JSONResponse(content=outcome.model_dump(mode="json"))

    @app.api_route("/instance/", methods=["GET", "DELETE", "POST"], include_in_schema=False)
    async def instance_without_id(request: Request) -> Response:
        """``/instance/`` names no instance: a 404 that says so (not a redirect to
        ``/instance``, which takes only POST); a POST is redirected there, as before."""
        if request.method == "POST":
            return RedirectResponse(request.url.replace(path="/instance"), status_code=307)
        return detail_response(404, NO_INSTANCE_ID)

    @app.post("/instance//replace", include_in_schema=False)
    async def replace_without_id() -> JSONResponse:
        return detail_response(404, NO_INSTANCE_ID)

    @app.get("/instance/{instance_id}")
    async def get_instance(instance_id: PathId) -> JSONResponse:
        """The instance as placed (``placement.predicted_ms_per_token``, each shard's
        ``predicted_stage_ms``) beside what its runners measured (``measured_ms_per_token``,
        ``measured_time_to_first_token_ms``, each shard's ``measured_stage_ms``)."""
        instance = context.store.state.instances.get(InstanceId(instance_id))
        if instance is None:
            return detail_response(404, f"no instance {echoed(instance_id)}")
        return JSONResponse(content=instance.model_dump(mode="json"))

    @app.post("/instance/{instance_id}/replace")
    async def replace_instance(instance_id: PathId) -> JSONResponse:
        """Decide the instance's placement afresh now (no margin, no hourly limit). 202 with
        the change when the new layout differs (it loads beside the serving one, make
        before break); 200 with ``changed: false`` when the same layout is still best."""
        result = await context.send_command(ReplaceInstance(instance_id=InstanceId(instance_id)))
        if not result.ok:
            return error_response(result)
        instance = context.store.state.instances.get(InstanceId(instance_id))
        if not result.event_indices:
            return JSONResponse(
                content={
                    "changed": False,
                    "detail": "a fresh decision gives the layout the instance has",
                    "instance": instance.model_dump(mode="json") if instance else None,
                }
            )
        started = context.store.event_at(result.event_indices[0])
        change = (
            started.event.replacement.change.model_dump(mode="json")
            if started is not None and isinstance(started.event, InstanceReplacementStarted)
            else None
        )
        return JSONResponse(status_code=202, content={"changed": True, "change": change})

    @app.delete("/instance/{instance_id}")
    async def delete_instance(instance_id: PathId) -> JSONResponse:
        result = await context.send_command(DeleteInstance(instance_id=InstanceId(instance_id)))
        if not result.ok:
            return error_response(result)
        return JSONResponse(content={"deleted": instance_id})

    app.include_router(chat_routes(context))
    install_metrics(app, context)
    app.include_router(dashboard_routes(context))
    return app
