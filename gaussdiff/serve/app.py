"""`gaussdiff serve`: the playground over HTTP (Starlette, run by uvicorn).

    GET  /                     the page (page.py)
    GET  /api/models           the models, their samplers, classes and guidance; the limits
    POST /api/sample           a JSON request (playground.check_request); the answer streams
                               NDJSON events: {"event": "queued"}, {"event": "step", "step",
                               "steps", "preview": PNG data URL of the x̂_0 grid}, then
                               {"event": "done", "id", "nfe", "seconds", "image", "png", "npz"}
                               or {"event": "error", "message"}
    GET  /api/result/ID.png    a finished result's grid, and ID.npz its images (ADM layout)

Errors are JSON {"error": message} with 400 (a bad field), 404 (no such model, result or
path), 405 (a wrong method), 413 (body too large) or 503 (the queue is full: retry later). Jobs run one at a time in a worker
thread; a client that disconnects cancels its job at the next step.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .page import PAGE
from .playground import BadRequest, Cancelled, Playground

MAX_BODY = 4096   # bytes of a sample request
RESULT_ID = re.compile(r"^[0-9a-f]{16}$")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(playground: Playground) -> Starlette:
    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def models(request: Request):
        return JSONResponse(playground.describe())

    async def sample(request: Request):
        raw = b""
        async for chunk in request.stream():   # read no more than MAX_BODY + one chunk
            raw += chunk
            if len(raw) > MAX_BODY:
                return error(f"the request body is over {MAX_BODY} bytes", 413)
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            return error("the request body is not JSON", 400)
        try:
            job = playground.check_request(body)
        except BadRequest as e:
            return error(str(e), e.status)
        if not playground.admit():
            return error("the server is busy (its queue is full): retry in a moment", 503)
        return StreamingResponse(stream(job), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store"})

    async def stream(job):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = [False]

        def on_step(step, steps, png):
            event = dict(event="step", step=step, steps=steps, preview=data_url(png))
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work():
            try:
                rid = playground.run(job, on_step, cancelled=lambda: gone[0])
                r = playground.result(rid)
                done = dict(event="done", id=rid, nfe=r.nfe, seconds=round(r.seconds, 3),
                            image=data_url(r.png), png=f"/api/result/{rid}.png",
                            npz=f"/api/result/{rid}.npz")
            except Cancelled:
                done = None
            except Exception as e:   # a sampler error (e.g. NaN): say it, keep serving
                done = dict(event="error", message=str(e).splitlines()[0] if str(e) else type(e).__name__)
            finally:
                playground.release()
            loop.call_soon_threadsafe(events.put_nowait, done)

        loop.run_in_executor(None, work)
        try:
            yield json.dumps(dict(event="queued", nfe_per_image=job.nfe)) + "\n"
            while True:
                event = await events.get()
                if event is None:
                    break
                yield json.dumps(event) + "\n"
                if event["event"] in ("done", "error"):
                    break
        finally:   # the client went away (or the stream ended): stop the job at its next step
            gone[0] = True

    async def result(request: Request):
        rid, ext = request.path_params["rid"], request.path_params["ext"]
        if not RESULT_ID.match(rid) or ext not in ("png", "npz"):
            return error("no such result", 404)
        try:
            r = await run_in_threadpool(playground.result, rid)
        except BadRequest as e:
            return error(str(e), e.status)
        if ext == "png":
            return Response(r.png, media_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="{rid}.png"'})
        return Response(r.npz, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{rid}.npz"'})

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return error("not found" if status == 404 else str(getattr(exc, "detail", exc)), status)

    return Starlette(exception_handlers={404: not_found, 405: not_found}, routes=[
        Route("/", page),
        Route("/api/models", models),
        Route("/api/sample", sample, methods=["POST"]),
        Route("/api/result/{rid}.{ext}", result),
    ])
