"""Adaptation served on Ray Serve (issue 38), through a real HTTP client against a running app
on a free 127.0.0.1 port: the served predictions equal the Python API's bit for bit for every
algorithm family (concurrent requests batched into one call), the task_id cache, every bad
input answered with its 4xx while good requests in the same second succeed, a replica killed
under load replaced, and bearer tokens. One Ray instance and one Serve app per module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

import distributed_maml as dm
from distributed_maml.use import serving

from .conftest import REPO
from .test_api import FAMILIES, HELD_OUT, _tasks
from .test_api import runs as runs  # noqa: F401  (the module's trained runs: the same fixture)

pytestmark = pytest.mark.ray
TOKEN = "a-test-token-of-some-length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(url: str, source: Path, **kw) -> None:
    from ray import serve

    serve.run(serving.build(serving.ServeSettings(source=str(source), device="cpu", **kw)), name=serving.APP_NAME)
    serving.wait_ready(url, timeout_s=60)


def body(rows, i: int, png: bool = False, **extra) -> dict:
    support = {"x": rows["x_support"][i].tolist(), "y": rows["y_support"][i].tolist()}
    query = {"x": rows["x_query"][i].tolist()}
    if png:
        support = {"png": _pngs(rows["x_support"][i]), "y": rows["y_support"][i].tolist()}
        query = {"png": _pngs(rows["x_query"][i])}
    return {"support": support, "query": query, **extra}


def _pngs(images: np.ndarray) -> list[str]:
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def post(url: str, payload, **kw) -> requests.Response:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return requests.post(f"{url}/adapt", data=data, timeout=60, **kw)


# plain MAML and conv4 with per-task BatchNorm in the default tier; the other families (the same
# code path, other inner loops) in the slow one, which .ci/run runs too
SERVED = [pytest.param(f, marks=[] if f in ("maml", "conv4-bn") else [pytest.mark.slow]) for f in sorted(FAMILIES)]


@pytest.mark.parametrize("family", SERVED)
def test_served_predictions_equal_the_api_for_every_family(ray_serve, runs, tmp_path, family):  # noqa: F811
    """The family's export served; its held-out tasks sent at once from 12 clients: batched
    (some answer names a batch of several), and every answer equals the API's bit for bit."""
    run_dir, store = runs[family]
    exported = dm.export(run_dir, tmp_path / family)
    deploy(ray_serve, exported, batch_wait_s=0.05)
    meta = dm.load(exported, device="cpu")
    rows = _tasks(store)
    images = len(meta.example_shape) == 3
    payloads = [body(rows, i, png=images and i % 2 == 0) for i in range(HELD_OUT)]
    with ThreadPoolExecutor(HELD_OUT) as pool:
        answers = list(pool.map(lambda p: post(ray_serve, p), payloads))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = [a.json() for a in answers]
    assert max(g["batch"] for g in got) > 1, (family, [g["batch"] for g in got])  # requests were batched
    for i, g in enumerate(got):
        with one_thread():  # as the replica computes (cpus_per_replica = 1): a conv's bits follow the threads
            want = meta.predict(rows["x_support"][i], rows["y_support"][i], rows["x_query"][i])
        if want.probabilities is None:
            np.testing.assert_array_equal(np.asarray(g["predictions"], dtype=np.float32), want.labels)
        else:
            np.testing.assert_array_equal(np.asarray(g["probabilities"], dtype=np.float32), want.probabilities)
            assert g["predictions"] == want.labels.tolist() and tuple(g["classes"]) == want.classes


def test_a_served_unicorn_run_adapts_more_classes_than_it_trained_on(ray_serve, tmp_path):
    """maml.head = unicorn, trained on 3-5 ways: a 12-way task served answers the API's bits
    (the export's head and limit on /info: any number of classes, up to 1,000)."""
    from .test_onthefly import _train, _twelve_way_task

    _train(tmp_path, "run", 2, extra=["task.ways=[3, 5]", "maml.head=unicorn"])
    exported = dm.export(tmp_path / "run", tmp_path / "export")
    deploy(ray_serve, exported)
    xs, names, xq = _twelve_way_task(tmp_path)
    payload = {"support": {"x": xs.tolist(), "y": np.repeat(names, 2).tolist()}, "query": {"x": xq.tolist()}}
    answer = post(ray_serve, payload)
    assert answer.status_code == 200, answer.text
    with one_thread():
        want = dm.load(exported, device="cpu").predict(xs, np.repeat(names, 2), xq)
    got = answer.json()
    assert tuple(got["classes"]) == tuple(names) and got["predictions"] == want.labels.tolist()
    np.testing.assert_array_equal(np.asarray(got["probabilities"], dtype=np.float32), want.probabilities)
    info = requests.get(f"{ray_serve}/card", timeout=30).json()
    assert (info["head"], info["most_ways"], info["trained_for"]["ways"]) == ("unicorn", 1000, 5)


@pytest.fixture(scope="module")
def maml_app(ray_serve, runs):  # noqa: F811
    """The plain-MAML run served straight from its run folder, with a token (on loopback a
    token is optional; given, it is required)."""
    run_dir, store = runs["maml"]
    deploy(ray_serve, run_dir, token=TOKEN, cache_size=2, max_batch=16, batch_wait_s=0.01)
    return ray_serve, dm.open_run(run_dir).meta_model(device="cpu"), _tasks(store)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_a_task_id_caches_the_adapted_weights(maml_app):
    url, meta, rows = maml_app
    first = post(url, body(rows, 0, task_id="alpha"), headers=AUTH).json()
    assert first["cached"] is False
    later = post(url, {"task_id": "alpha", "query": {"x": rows["x_query"][4].tolist()}}, headers=AUTH).json()
    assert later["cached"] is True
    with one_thread():
        want = meta.adapt(rows["x_support"][0], rows["y_support"][0]).predict_proba(rows["x_query"][4])
    np.testing.assert_array_equal(np.asarray(later["probabilities"], dtype=np.float32), want)
    for name in ("b", "c"):  # cache_size 2: alpha is dropped, least recently used
        assert post(url, body(rows, 1, task_id=name), headers=AUTH).status_code == 200
    gone = post(url, {"task_id": "alpha", "query": {"x": rows["x_query"][4].tolist()}}, headers=AUTH)
    assert gone.status_code == 404 and "send its support set" in gone.json()["error"]


def _bad_requests(rows) -> list[tuple[bytes, int, str]]:
    good = body(rows, 2)
    nan = json.dumps(good).replace(str(rows["x_query"][2][0][0]), "NaN", 1).encode()
    three_ways = {**good, "support": {"x": rows["x_support"][2][:3].tolist(), "y": [0, 1, 2]}}
    wide = {**good, "query": {"x": [row + [0.0] for row in rows["x_query"][2].tolist()]}}
    many_shots = {**good, "support": {"x": [rows["x_support"][2][0].tolist()] * 102, "y": [0] * 101 + [1]}}
    return [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (nan, 400, "NaN is not a finite number"),
        (json.dumps(three_ways).encode(), 422, "tells at most 2 apart"),
        (json.dumps(wide).encode(), 422, "this model takes [N >= 1, 10]"),
        (json.dumps(many_shots).encode(), 413, "at most 100 a class"),
        (json.dumps({**good, "steps": -1}).encode(), 422, "steps must be"),
        (json.dumps({**good, "extra": 1}).encode(), 422, "unknown field(s) extra"),
        (json.dumps({"query": good["query"]}).encode(), 422, "neither 'support' nor a 'task_id'"),
        (b"x" * (9 * 2**20), 413, "at most 8388608"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nests"),  # the parser's recursion: once a 500
        (json.dumps({**good, "support": {**good["support"], "x": (rows["x_support"][2] * 1e30).tolist()}}).encode(),
         422, "adaptation diverged"),
    ]  # fmt: skip


def test_every_bad_input_gets_its_4xx_while_good_requests_succeed(maml_app):
    url, meta, rows = maml_app
    bad = _bad_requests(rows)
    jobs = [(b, s, n) for b, s, n in bad] + [(json.dumps(body(rows, i)).encode(), 200, "") for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: post(url, j[0], headers=AUTH), jobs))
    for (_, status, needle), a in zip(jobs, answers, strict=True):
        assert a.status_code == status, (status, a.status_code, a.text[:300])
        if needle:
            line = a.json()["error"]
            assert needle in line and "\n" not in line, line
    assert post(url, body(rows, 3), headers=AUTH).status_code == 200  # and it goes on serving


def test_without_the_token_the_service_refuses(maml_app):
    url, _, rows = maml_app
    assert post(url, body(rows, 0)).status_code == 401
    assert post(url, body(rows, 0), headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert requests.get(f"{url}/card", timeout=30).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no token
    assert requests.get(f"{url}/card", headers=AUTH, timeout=30).json()["input_shape"] == [10]


def adapter_replicas() -> list[dict]:
    """The Adapter deployment's replica actors (not the task cache's)."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return [a for a in actors if "SERVE_REPLICA" in a["name"] and "Adapter" in a["name"]]


@pytest.mark.cluster  # a replica killed under load (~7 s): with the cluster tier's fault phases
def test_a_replica_killed_under_load_is_replaced(maml_app):
    import ray

    url, _, rows = maml_app
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                statuses.append((time.monotonic(), post(url, body(rows, 1), headers=AUTH).status_code))
            except requests.RequestException:
                statuses.append((time.monotonic(), -1))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        replicas = adapter_replicas()
        assert len(replicas) == 1, replicas
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        killed = time.monotonic()
        deadline = killed + 90
        while time.monotonic() < deadline and not any(t > killed + 0.5 and s == 200 for t, s in statuses):
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert any(t < killed and s == 200 for t, s in statuses)  # it served before
    after = [s for t, s in statuses if t > killed + 0.5]
    assert 200 in after, statuses[-20:]  # and again, from the new replica
    now = adapter_replicas()
    assert now and now[0]["name"] != replicas[0]["name"]  # a new replica took its place
    assert post(url, body(rows, 2), headers=AUTH).status_code == 200


@pytest.mark.cluster
def test_the_readme_serve_command_in_a_shell_beyond_loopback(runs, tmp_path):  # noqa: F811
    """`distributed-maml serve` as a shell runs it, bound to 0.0.0.0 with a token file (its own
    local Ray): requests without the token are refused, with it answered; SIGTERM stops it."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, "-m", "distributed_maml", "serve", "--run", str(runs["maml"][0]), "--host", "0.0.0.0",
           "--port", str(port), "--token-file", str(token)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the command's own word that it serves (and handles SIGTERM)
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines)[-2000:]
        rows = _tasks(runs["maml"][1])
        url = f"http://127.0.0.1:{port}"
        assert post(url, body(rows, 0)).status_code == 401
        assert post(url, body(rows, 0), headers=AUTH).status_code == 200
        proc.terminate()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopping the service" in out, out[-2000:]  # a service stopped as asked


def test_a_cached_task_is_answered_by_every_replica(ray_serve, runs):  # noqa: F811
    """--replicas 2: 20 tasks adapted under task ids, then 20 lookups by id alone, each on a new
    connection: every one answered with its adapted answer's bits, some by the replica that did
    not adapt it (those were 404s while each replica kept its own cache); the cache stays
    bounded (cache_size 20: a 21st task drops the least recently used)."""
    run_dir, store = runs["maml"]
    deploy(ray_serve, run_dir, replicas=2, cpus_per_replica=0.5, cache_size=20)
    rows = _tasks(store)
    adapted = {}
    for i in range(20):
        r = post(ray_serve, body(rows, i % HELD_OUT, task_id=f"t{i}"))
        assert r.status_code == 200, r.text
        adapted[f"t{i}"] = (r.headers["x-replica"], r.json())
    crossed = 0
    for i in range(20):
        query = {"x": rows["x_query"][i % HELD_OUT].tolist()}
        r = post(ray_serve, {"task_id": f"t{i}", "query": query})
        assert r.status_code == 200, r.text
        first_replica, first = adapted[f"t{i}"]
        assert r.json()["cached"] is True and r.json()["probabilities"] == first["probabilities"]
        crossed += r.headers["x-replica"] != first_replica
    replicas = {rep for rep, _ in adapted.values()}
    assert len(replicas) == 2 and crossed > 0, (replicas, crossed)  # both served; lookups crossed replicas
    assert post(ray_serve, body(rows, 0, task_id="t20")).status_code == 200  # t0 is now the least recent
    gone = post(ray_serve, {"task_id": "t0", "query": {"x": rows["x_query"][0].tolist()}})
    assert gone.status_code == 404 and "send its support set" in gone.json()["error"]
    assert post(ray_serve, {"task_id": "t1", "query": {"x": rows["x_query"][1].tolist()}}).status_code == 200
