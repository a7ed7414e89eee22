"""Adaptation served on Ray Serve: a run's (or an export's) meta-model behind POST /adapt.

- Each replica loads the meta-model once, on its own device (its CPU or GPU slice).
- Concurrent requests are batched (`@serve.batch`): the batch's tasks are adapted in one
  vmapped call (MetaModel.adapt_many) and scored in another, on the replica's device. A task's
  predictions do not depend on what it was batched with (metamodel.MetaModel._stack), so a
  served request answers what the Python API and `distributed-maml adapt` answer, bit for bit.
- A request naming a `task_id` has its adapted weights cached (LRU, `cache_size` tasks) in the
  service's one task cache (a deployment of its own, use/adaptbatch.TaskCache): a later request
  with that id and no support set skips adaptation, whichever replica answers it.
- Bound to 127.0.0.1 by default. Bound beyond loopback it needs a bearer token (read from a
  file): every request but GET /healthz then carries `Authorization: Bearer <token>`.
- A bad request gets a 4xx and one line (`{"error": "..."}`); the replica goes on serving.

The request schema is in use/adaptrequest.py (and in the service's own /docs); a batch's answers
are computed in use/adaptbatch.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (Request) as objects, and the deployment's class is made inside `build`, whose names a
# string annotation could not be resolved against.

import asyncio
import hmac
import ipaddress
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distributed_maml.errors import UserError
from distributed_maml.use.adaptbatch import CachedTask, Job, Reply, TaskCache, answer
from distributed_maml.use.adaptrequest import REQUEST_SCHEMA, Limits, RequestError, parse

APP_NAME = "distributed-maml"
CACHE_TIMEOUT_S = 10.0  # a cache lookup or store that takes longer is a 503 (its replica is being replaced)


@dataclass(frozen=True)
class ServeSettings:
    """One served meta-model: where it comes from, the replicas and their slices, batching,
    the cache and the limits (the CLI's flags and the Serve config's `args`)."""

    source: str  # a run folder or an export folder
    checkpoint: str | None = None  # a run's best, latest or step_N
    device: str = "auto"
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch: int = 64
    batch_wait_s: float = 0.0  # 0: a batch is what queued while the last one ran (no wait at low load)
    batched: bool = True
    cache_size: int = 1024
    token: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name, ok in (
            ("replicas", self.replicas >= 1),
            ("cpus_per_replica", self.cpus_per_replica > 0),
            ("gpus_per_replica", self.gpus_per_replica >= 0),
            ("max_batch", self.max_batch >= 1),
            ("batch_wait_s", 0 <= self.batch_wait_s <= 10),
            ("cache_size", self.cache_size >= 0),
        ):
            if not ok:
                raise UserError(f"serve: {name} is out of range, got {getattr(self, name)!r}")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeSettings":
        """From a Serve config's `args` (jobs/serve.yaml): the same names, token_file for the token."""
        args = dict(args)
        token_file = args.pop("token_file", None)
        host = args.pop("host", "127.0.0.1")
        limits = Limits(**args.pop("limits", {}))
        try:
            settings = cls(**args, token=read_token(token_file) if token_file else None, limits=limits)
        except TypeError as e:
            raise UserError(f"serve config args: {e}") from None
        check_binding(host, settings.token)
        return settings


def read_token(path: str | Path) -> str:
    """The bearer token in a file (its first line); one line if it is missing or empty."""
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as e:
        raise UserError(f"--token-file {path}: {e.strerror}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise UserError(f"--token-file {path} must hold a token of at least 16 characters on its first line")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Beyond loopback, a token is required: anyone who reaches the port could adapt otherwise."""
    if not is_loopback(host) and token is None:
        raise UserError(
            f"serving on {host} reaches beyond this machine: give --token-file FILE (a bearer token), "
            "or bind to 127.0.0.1"
        )


def check_port(host: str, port: int) -> None:
    """One line if host:port cannot be bound (in use, or not this machine's address)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --port or --host") from None


def build(settings: ServeSettings) -> Any:
    """The Serve application of these settings (for serve.run)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(
        title="distributed-maml adaptation",
        description="Adapt a meta-learned initialisation to your support set and predict your queries.",
    )

    @serve.deployment(name="TaskCache", num_replicas=1, ray_actor_options={"num_cpus": 0})
    class CacheServer:
        """The service's one task cache: every replica reads and fills it."""

        def __init__(self, size: int) -> None:
            self.cache = TaskCache(size)

        def get(self, task_id: str) -> CachedTask | None:
            return self.cache.get(task_id)

        def put(self, task_id: str, entry: CachedTask) -> None:
            self.cache.put(task_id, entry)

    @serve.deployment(
        name="Adapter",
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        max_ongoing_requests=max(2 * settings.max_batch, 8),
        health_check_period_s=2.0,
    )
    @serve.ingress(api)
    class Adapter:
        def __init__(self, settings: ServeSettings, tasks: Any) -> None:
            import torch

            from distributed_maml.use.export import load_any

            torch.set_num_threads(max(1, int(settings.cpus_per_replica)))
            device = (
                "cuda" if settings.gpus_per_replica > 0 else ("cpu" if settings.device == "auto" else settings.device)
            )
            self.meta = load_any(settings.source, settings.checkpoint, device)
            self.settings = settings
            self.tasks = tasks  # the CacheServer's handle
            self.replica = serve.get_replica_context().replica_id.unique_id  # answers name it (x-replica)
            self.run_batch.set_max_batch_size(settings.max_batch)
            self.run_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

        def _denied(self, request: Request) -> JSONResponse | None:
            token = self.settings.token
            if token is None:
                return None
            given = request.headers.get("authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return None
            return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}, 401)

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/card")
        async def card(self, request: Request) -> Any:
            denied = self._denied(request)
            if denied is not None:
                return denied
            meta = self.meta
            return {
                "model": meta.describe(),
                "kind": meta.kind,
                "input_shape": list(meta.example_shape),
                "outputs": meta.outputs,
                "trained_for": {"ways": meta.info.ways, "shots": meta.info.shots},
                "head": meta.config.maml.head,
                "most_ways": meta.most_ways,
                "limits": asdict(self.settings.limits),
            }

        @api.post(
            "/adapt",
            openapi_extra={
                "requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}}
            },
        )
        async def adapt(self, request: Request) -> Any:
            denied = self._denied(request)
            if denied is not None:
                return denied
            limits = self.settings.limits
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_body_bytes:
                return self._reply(413, {"error": f"request of {declared} bytes; at most {limits.max_body_bytes}"})
            try:
                item = parse(self.meta, await request.body(), limits)
                cached = None
                if item.support is None:
                    cached = await self._cache("get", item.task_id)
                    if cached is None:
                        raise RequestError(404, f"task_id {item.task_id!r} is not cached; send its support set again")
                job = Job(item, cached)
                reply = await self.run_batch(job) if self.settings.batched else answer(self.meta, [job])[0]
                if reply.remember is not None and self.settings.cache_size:
                    await self._cache("put", item.task_id, reply.remember)
                return self._reply(reply.status, reply.body)
            except RequestError as e:
                return self._reply(e.status, {"error": e.line})

        async def _cache(self, method: str, *args: Any) -> Any:
            """A call to the task cache, bounded: one line (503) if it does not answer."""
            try:
                return await asyncio.wait_for(getattr(self.tasks, method).remote(*args), CACHE_TIMEOUT_S)
            except Exception as e:  # a timeout, or the cache's replica lost (Serve starts another)
                raise RequestError(
                    503, f"the task cache did not answer ({type(e).__name__}); send the support set again"
                ) from None

        def _reply(self, status: int, body: dict[str, Any]) -> JSONResponse:
            return JSONResponse(body, status, headers={"x-replica": self.replica})

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)  # both set from the settings in __init__
        async def run_batch(self, jobs: list[Job]) -> list[Reply]:
            return answer(self.meta, jobs)

    return Adapter.bind(settings, CacheServer.bind(settings.cache_size))


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run` / `serve deploy` entry point (jobs/serve.yaml: import_path
    distributed_maml.use.serving:app_builder, with ServeSettings' names as args)."""
    return build(ServeSettings.from_args(args))


def start(settings: ServeSettings, host: str, port: int) -> str:
    """Starts the app on this Ray (the driver's: RAY_ADDRESS, or a local one) at host:port; its URL."""
    from ray import serve

    check_binding(host, settings.token)
    check_port(host, port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Until GET /healthz answers (a replica is up), or one line after `timeout_s`."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    probe = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
    while True:
        try:
            with urllib.request.urlopen(f"{probe}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the service at {url} did not answer within {timeout_s:.0f} s; see Ray's serve logs")
        time.sleep(0.25)
