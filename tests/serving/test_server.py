"""python -m ldm.serve for real: uvicorn in a subprocess on 127.0.0.1, spoken to over HTTP.

One server (auth, adapters, batching) answers most tests; a second, deliberately small one
(one image per batch, one waiting request, a 1 s timeout) shows the limits, and a third
is stopped with SIGTERM."""

import asyncio
import base64
import os
import shlex
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir
from servingutils import TOKEN, ldm_serve

from ldm import CONF_DIR
from ldm.app.sample import sample

pytestmark = pytest.mark.xdist_group("server")  # one worker: each server starts once
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def server(model):
    with ldm_serve(
        f"checkpoint={model['checkpoint']}",
        f"adapters_dir={model['adapters']}",
        f"token_file={model['root'] / 'token'}",
        "max_wait_ms=500",  # a generous gathering window: the batching test relies on it
    ) as (url, _):
        yield url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images", json=body, headers=AUTH, timeout=120)


def _field(response: httpx.Response) -> list:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"]


def test_health_models_and_auth(server, model):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json() == {"ready": True}
    assert httpx.get(f"{server}/v1/models").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{server}/v1/models", headers=wrong).status_code == 401
    assert httpx.post(f"{server}/v1/images", json={"prompt": PROMPT}).status_code == 401
    info = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert info["checkpoint"] == str(model["checkpoint"]) and info["prediction"] == "eps"
    assert info["adapters"] == [
        "broken.safetensors",
        "other_model.safetensors",
        "style.safetensors",
        "style2.safetensors",
    ]
    assert "ddim" in info["samplers"] and info["image_size"] == [16, 16]
    assert httpx.get(f"{server}/docs").status_code == 200  # OpenAPI docs
    assert "/v1/images" in httpx.get(f"{server}/openapi.json").json()["paths"]
    metrics = httpx.get(f"{server}/metrics").text
    assert 'ldm_requests_total{status="401"}' in metrics  # every answer counts


def test_an_image_does_not_depend_on_its_batch(server):
    alone = _post(server, prompt=PROMPT, seed=7, steps=4, response_format="png")
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    others = [f"a {c} square" for c in ("blue", "green", "yellow", "purple", "orange", "cyan")]

    async def together():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            bodies = [{"prompt": PROMPT, "seed": 7}] + [
                {"prompt": p, "seed": i} for i, p in enumerate(others)
            ]
            bodies.append({"prompt": [PROMPT, "a blue square"], "seed": 3})  # 8 requests, 9 images
            return await asyncio.gather(
                *(client.post(f"{server}/v1/images", json={**b, "steps": 4}) for b in bodies)
            )

    before = _batches(server)
    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    first = responses[0].json()["images"][0]
    assert base64.b64decode(first["png_base64"]) == alone.content  # byte-identical
    count, images = (a - b for a, b in zip(_batches(server), before, strict=True))
    assert images == 9 and count < 8  # 9 images in fewer batches than requests
    last = responses[-1].json()
    assert [i["prompt"] for i in last["images"]] == [PROMPT, "a blue square"]
    assert [i["seed"] for i in last["images"]] == [3, 3]  # each prompt's k-th image: seed + k


def _batches(url: str) -> tuple[float, float]:
    """(batches run, images in them) from the Prometheus metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith(("ldm_batch_images_count", "ldm_batch_images_sum")):
            name, value = line.split()
            values[name] = float(value)
    return values["ldm_batch_images_count"], values["ldm_batch_images_sum"]


@pytest.mark.parametrize(
    "extra", [{}, {"eta": 0.5, "adapters": {"style.safetensors": 0.7}}], ids=["plain", "eta+lora"]
)
def test_the_response_regenerates_with_sample_py(server, tmp_path, extra):
    body = _post(server, prompt=PROMPT, seed=11, steps=3, negative_prompt="a green square", **extra)
    image = body.json()["images"][0]
    args = shlex.split(image["sample_py"])
    assert args[:2] == ["python", "sample.py"] and "seed=11" in args
    assert 'negative_prompt="a green square"' in args
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[*args[2:], "device=cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        (path,) = sample(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert path.read_bytes() == base64.b64decode(image["png_base64"])


def test_adapters_act_by_weight_and_stay_in_their_folder(server, model):
    def png(**adapters):
        body = dict(prompt=PROMPT, seed=1, steps=3, response_format="png", adapters=adapters)
        response = _post(server, **body)
        assert response.status_code == 200, response.text
        return response.content

    plain = png()
    assert png(**{"style.safetensors": 0.0}) == plain
    on = png(**{"style.safetensors": 1.0})
    assert on != plain and png(**{"style.safetensors": 1.0}) == on  # no dropout when serving
    assert png() == plain  # nothing left over from the last batch
    for name in ("../outside.safetensors", str(model["root"] / "outside.safetensors")):
        assert _field(_post(server, prompt=PROMPT, adapters={name: 1.0}))[1:] == ["adapters", name]
    for name in ("missing.safetensors", "notes.txt"):
        assert _field(_post(server, prompt=PROMPT, adapters={name: 1.0}))[1:] == ["adapters", name]
    assert _field(_post(server, prompt=PROMPT, adapters={"style.safetensors": float("1e9")}))
    for bad in ("broken.safetensors", "other_model.safetensors"):  # corrupt; wrong shapes
        response = _post(server, prompt=PROMPT, steps=2, adapters={bad: 1.0})
        assert _field(response) == ["body", "adapters", bad]
        assert bad in response.json()["detail"][0]["msg"]
    assert png() == plain  # still serving, the model untouched
    assert png(**{"style2.safetensors": 1.0}) == on  # and a good adapter still loads


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 10_000}, "steps"),
        ({"sampler": "warp"}, "sampler"),
        ({"size": 48}, "size"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"prompt": "a red circle " * 20}, "prompt"),
        ({"negative_prompt": "blue " * 40}, "negative_prompt"),
        ({"sampler": "heun", "eta": 0.5}, "eta"),
        ({"guidance": -1}, "guidance"),
        ({"labels": [1]}, "prompt"),
        ({"response_format": "gif"}, "response_format"),
        ({"response_format": "png", "n": 2}, "response_format"),
    ],
)
def test_bad_requests_are_422_naming_the_field(server, body, field):
    assert _field(_post(server, **{"prompt": PROMPT, **body}))[1] == field


@pytest.fixture(scope="module")
def small(model):
    with ldm_serve(
        f"checkpoint={model['checkpoint']}",
        "max_batch=1",
        "max_images=1",
        "max_queue=1",
        "max_wait_ms=0",
        "timeout_s=1",
        "max_steps=2000",
    ) as (url, proc):
        yield url, proc


def test_a_full_queue_is_429_and_a_slow_request_504(small):
    url, _ = small

    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            # the schedule's every timestep: far longer than the 1 s timeout on any machine
            body = {"prompt": PROMPT, "steps": 1000}
            return await asyncio.gather(
                *(client.post(f"{url}/v1/images", json=body) for _ in range(5))
            )

    codes = sorted(r.status_code for r in asyncio.run(flood()))
    # at most one runs and one waits (both past the timeout: 504), the rest are turned away
    assert 429 in codes and 504 in codes and 200 not in codes, codes
    busy = next(r for r in asyncio.run(flood()) if r.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1
    # more steps than the schedule's 1000 timesteps, though within max_steps: 422, not 500
    response = httpx.post(f"{url}/v1/images", json={"prompt": PROMPT, "steps": 1001})
    assert _field(response)[1] == "steps" and "1..1000" in response.text


def _gauges(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {
        name: float(value)
        for name, value in (line.split() for line in lines if not line.startswith("#"))
        if name in ("ldm_queue_depth", "ldm_images_in_progress")
    }


def _until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_sigterm_finishes_in_flight_requests_then_exits_0(model):
    with ldm_serve(f"checkpoint={model['checkpoint']}") as (url, proc):
        result = {}

        def request():
            result["response"] = httpx.post(
                f"{url}/v1/images", json={"prompt": PROMPT, "steps": 200}, timeout=60
            )

        client = threading.Thread(target=request)
        client.start()
        _until(lambda: _gauges(url)["ldm_images_in_progress"] > 0)  # in flight
        os.kill(proc.pid, signal.SIGTERM)
        client.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert result["response"].status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_a_queued_request_whose_client_left_is_dropped(model):
    with ldm_serve(
        f"checkpoint={model['checkpoint']}",
        "max_batch=1",
        "max_images=1",
        "max_wait_ms=0",
        "max_steps=1000",
    ) as (url, _):
        body = {"prompt": PROMPT, "steps": 1000}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/images", json=body, timeout=120)
            _until(lambda: _gauges(url)["ldm_images_in_progress"] == 1)
            with pytest.raises(httpx.TimeoutException):  # the second gives up while queued
                httpx.post(f"{url}/v1/images", json=body, timeout=0.05)
            assert first.result().status_code == 200
        _until(lambda: sum(_gauges(url).values()) == 0)  # nothing waits, nothing runs
        time.sleep(0.5)  # a second batch would have started by now
        text = httpx.get(f"{url}/metrics").text
        assert "ldm_batch_images_count 1.0" in text  # the first request's batch only
        assert 'ldm_requests_total{status="499"} 1.0' in text
