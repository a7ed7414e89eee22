"""The served adaptation request: its JSON schema, and its checking into a typed `AdaptRequest`
(Ray-free, so every bad input is tested without a server). A bad request is a `RequestError`:
an HTTP status and one line naming what is wrong.

    POST /adapt
    {
      "task_id": "optional: cache this task's adapted weights under this name",
      "steps":   optional inner steps (default: the run's),
      "support": {"x": [[...], ...], "y": [...]}        (or "png": ["<base64 PNG>", ...] with "y"),
      "query":   {"x": [[...], ...]}                      (or "png": [...])
    }

`support` may be left out when `task_id` names a task this replica adapted before (its weights
are cached, least recently used dropped first): then only the queries are scored. The answer:
{"task_id", "cached", "steps", "predictions", and for classification "probabilities", "classes"}.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from distributed_maml.data.families import folders
from distributed_maml.errors import InputError
from distributed_maml.use.metamodel import MetaModel


@dataclass(frozen=True)
class Limits:
    """What one request may hold (each over-limit request gets a 4xx, the service goes on)."""

    max_body_bytes: int = 8 * 2**20
    max_shots: int = 100  # support examples per class (regression: support examples / 1)
    max_support: int = 2000  # support examples in all
    max_queries: int = 2000
    max_steps: int = 100
    max_task_id: int = 200  # characters


class RequestError(Exception):
    """A request answered with `status` and one line (the service goes on)."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status, self.line = status, line


@dataclass(frozen=True)
class AdaptRequest:
    task_id: str | None
    steps: int | None
    support: tuple[np.ndarray, np.ndarray] | None  # (examples, labels), checked against the model
    query: np.ndarray


_SET = {
    "type": "object",
    "properties": {
        "x": {"type": "array", "description": "examples [N, *input_shape] (images: uint8 0..255 or floats in [0, 1])"},
        "png": {"type": "array", "items": {"type": "string"}, "description": "or: images as base64 PNG"},
        "y": {"type": "array", "description": "support labels (any numbers or strings) or regression targets"},
    },
}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["query"],
    "properties": {
        "task_id": {"type": "string", "maxLength": Limits.max_task_id},
        "steps": {"type": "integer", "minimum": 0},
        "support": _SET,
        "query": _SET,
    },
}


def parse(meta: MetaModel, body: bytes, limits: Limits) -> AdaptRequest:
    """The request in `body`, checked against the model and the limits."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request of {len(body)} bytes; at most {limits.max_body_bytes}")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request is not JSON: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:  # the parser recurses once per level: 100,000 nested arrays end here
        raise RequestError(
            400, "the request nests arrays or objects too deeply; examples need at most 4 levels"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request must be a JSON object with 'query' (and 'support' or 'task_id')")
    unknown = sorted(set(data) - {"task_id", "steps", "support", "query"})
    if unknown:
        raise RequestError(
            422, f"unknown field(s) {', '.join(unknown)}; a request takes task_id, steps, support, query"
        )
    task_id = data.get("task_id")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= limits.max_task_id):
        raise RequestError(422, f"task_id must be a string of 1 to {limits.max_task_id} characters")
    steps = data.get("steps")
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= limits.max_steps
    ):
        raise RequestError(422, f"steps must be a whole number in [0, {limits.max_steps}], got {steps!r}")
    if "query" not in data:
        raise RequestError(422, "the request has no 'query': {'x': [...]} (or 'png') to predict")
    query = _examples(meta, data["query"], "query", limits.max_queries)
    support = None
    if data.get("support") is not None:
        support = _support(meta, data["support"], limits)
    elif task_id is None:
        raise RequestError(422, "the request has neither 'support' nor a 'task_id' adapted before")
    return AdaptRequest(task_id, steps, support, query)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _examples(meta: MetaModel, part: Any, what: str, most: int) -> np.ndarray:
    if not isinstance(part, dict) or ("x" in part) == ("png" in part):
        raise RequestError(422, f"'{what}' must be an object with 'x' (arrays) or 'png' (base64 images)")
    if "png" in part:
        items = part["png"]
        if not isinstance(items, list) or not items:
            raise RequestError(422, f"'{what}.png' must be a non-empty list of base64 PNG strings")
        if len(items) > most:
            raise RequestError(413, f"'{what}' holds {len(items)} examples; at most {most}")
        x = np.stack([_png(meta, s, f"{what}.png[{i}]") for i, s in enumerate(items)])
    else:
        try:
            x = np.asarray(part["x"])
        except ValueError:
            raise RequestError(422, f"'{what}.x' is ragged: every example must have the same shape") from None
        if x.ndim == 0 or len(x) > most:
            raise RequestError(
                413 if x.ndim else 422, f"'{what}' holds {x.size if x.ndim else 0} examples; at most {most}"
            )
        if x.dtype.kind not in "uif" or x.dtype == bool:
            raise RequestError(422, f"'{what}.x' must hold numbers, got {x.dtype}")
    try:
        meta.inputs(x, f"'{what}'")  # shape and finiteness, as the model will see them
    except InputError as e:
        raise RequestError(422, str(e)) from None
    return x


def _png(meta: MetaModel, text: Any, what: str) -> np.ndarray:
    shape = meta.example_shape
    if len(shape) != 3:
        raise RequestError(422, f"{what}: this model takes vectors of {shape[0]} features, not images")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise RequestError(422, f"{what} is not base64") from None
    image = folders.decode(io.BytesIO(raw), shape[1], grayscale=shape[0] == 1)
    if image is None:
        raise RequestError(422, f"{what} is not a readable image")
    return image


def _support(meta: MetaModel, part: Any, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    x = _examples(meta, part, "support", limits.max_support)
    if "y" not in part or not isinstance(part["y"], list):
        raise RequestError(422, "'support.y' must be a list: a label (or target) per support example")
    y = np.asarray(part["y"], dtype=object if any(isinstance(v, str) for v in part["y"]) else None)
    if meta.kind == "classification":
        if y.dtype == object:
            y = y.astype(str)
        _, counts = np.unique(y, return_counts=True) if len(y) else (None, np.zeros(0))
        if len(counts) and counts.max() > limits.max_shots:
            raise RequestError(413, f"a class has {counts.max()} support examples; at most {limits.max_shots} a class")
    elif y.dtype.kind not in "uif" or not all(math.isfinite(float(v)) for v in y.reshape(-1)):
        raise RequestError(422, "'support.y' must hold finite numbers (regression targets)")
    try:
        meta.support_set(x, y, "the request")  # labels and ways, as adapt will take them
    except InputError as e:
        raise RequestError(422, str(e)) from None
    return x, y
