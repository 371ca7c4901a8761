"""`gaussdiff serve`: the playground's HTTP API in process (Starlette's TestClient). A streamed
result is the image `Pipeline.sample` draws alone with the same options, bit for bit; the last
preview of a DDIM run is its x̂_0 at t = 0, which is the final image; every bad field is a JSON
4xx naming it; a full queue is 503; nothing from a request reaches the file system."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

import gaussdiff  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from gaussdiff.errors import UsageError  # noqa: E402
from gaussdiff.images import make_grid  # noqa: E402
from gaussdiff.sampling.guidance import Guidance  # noqa: E402
from gaussdiff.serve.app import make_app  # noqa: E402
from gaussdiff.serve.playground import Cancelled, Job, Limits, Playground  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "models", "fashion-small")
EDM = os.path.join(ROOT, "models", "fashion-cond-edm")


@pytest.fixture(scope="module")
def playground():
    return Playground([SMALL, EDM], device="cpu", limits=Limits(max_nfe=20, max_images=4))


@pytest.fixture(scope="module")
def client(playground):
    return TestClient(make_app(playground))


def stream(client, body):
    r = client.post("/api/sample", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def decode_png(data_url):
    assert data_url.startswith("data:image/png;base64,")
    import base64
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_models_are_described(client):
    info = client.get("/api/models").json()
    by = {m["name"]: m for m in info["models"]}
    assert set(by) == {"fashion-small", "fashion-cond-edm"}
    assert "ddpm" in by["fashion-small"]["samplers"] and "ddim" in by["fashion-small"]["samplers"]
    assert "ddpm" not in by["fashion-cond-edm"]["samplers"]   # σ-space: no discrete engine
    assert "adaptive" not in by["fashion-small"]["samplers"]  # its NFE is not known in advance
    assert by["fashion-cond-edm"]["guidance"] == "classifier-free"
    assert by["fashion-small"]["guidance"] is None and by["fashion-small"]["num_classes"] is None
    assert by["fashion-cond-edm"]["num_classes"] == 10 and len(by["fashion-cond-edm"]["class_names"]) == 10
    assert info["limits"] == {"max_nfe": 20, "max_images": 4}
    page = client.get("/")
    assert page.status_code == 200 and "gaussdiff playground" in page.text


def test_a_streamed_result_is_the_sample_drawn_alone(client):
    events = stream(client, dict(model="fashion-small", sampler="ddim", steps=5, seed=3, num=2))
    assert events[0]["event"] == "queued" and events[-1]["event"] == "done"
    steps = [e for e in events if e["event"] == "step"]
    assert steps and steps[-1]["step"] == steps[-1]["steps"] == 5
    done = events[-1]
    assert done["nfe"] == 5
    npz = client.get(done["npz"])
    assert npz.status_code == 200
    with np.load(io.BytesIO(npz.content)) as z:
        got = z["arr_0"]
    want, _ = gaussdiff.load(SMALL, device="cpu").sample(2, "ddim", 5, seed=3, progress=False)
    np.testing.assert_array_equal(got, want)
    grid = make_grid(want)
    np.testing.assert_array_equal(decode_png(done["image"]), grid[..., 0])
    png = client.get(done["png"])
    assert png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), grid[..., 0])
    # DDIM's last step: x_0 = x̂_0 (ᾱ_prev = 1), so the last preview is the final grid
    np.testing.assert_array_equal(decode_png(steps[-1]["preview"]), grid[..., 0])


def test_classifier_free_guidance_and_a_class(client):
    body = dict(model="fashion-cond-edm", sampler="heun", steps=3, seed=1, num=2, label=7,
                guidance_scale=2.0, temperature=1.0)
    done = stream(client, body)[-1]
    assert done["event"] == "done" and done["nfe"] == 5   # Heun: 2N − 1
    with np.load(io.BytesIO(client.get(done["npz"]).content)) as z:
        got, labels = z["arr_0"], z["arr_1"]
    want, want_labels = gaussdiff.load(EDM, device="cpu").sample(
        2, "heun", 3, seed=1, labels=[7, 7], progress=False, guidance=Guidance(cfg_scale=2.0))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(labels, want_labels)


@pytest.mark.parametrize("body, status, mentions", [
    (dict(model="nope"), 404, "model"),
    (dict(model="../models/fashion-small"), 404, "model"),
    (dict(model=3), 400, "model"),
    (dict(model="fashion-small", sampler="warp"), 400, "sampler"),
    (dict(model="fashion-cond-edm", sampler="ddpm"), 400, "sampler"),
    (dict(model="fashion-small", steps=21), 400, "steps"),                 # above max_nfe 20
    (dict(model="fashion-cond-edm", sampler="heun", steps=11), 400, "21 network evaluations"),
    (dict(model="fashion-small", steps=0), 400, "steps"),
    (dict(model="fashion-small", steps="5"), 400, "steps"),
    (dict(model="fashion-small", steps=5, seed=-1), 400, "seed"),
    (dict(model="fashion-small", steps=5, num=5), 400, "num"),             # above max_images 4
    (dict(model="fashion-small", steps=5, num=True), 400, "num"),
    (dict(model="fashion-small", steps=5, label=0), 400, "no classes"),
    (dict(model="fashion-cond-edm", steps=5, label=10), 400, "label"),
    (dict(model="fashion-small", steps=5, guidance_scale=2), 400, "guidance_scale"),
    (dict(model="fashion-cond-edm", steps=5, guidance_scale=float("inf")), 400, "guidance_scale"),
    (dict(model="fashion-small", steps=5, temperature="hot"), 400, "temperature"),
    (dict(model="fashion-small", steps=5, temperature=0), 400, "temperature"),
    (dict(model="fashion-small", steps=5, path="/etc/passwd"), 400, "unknown field 'path'"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_fields_are_named(client, body, status, mentions):
    r = client.post("/api/sample", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert mentions in r.json()["error"]


def test_bad_bodies_and_results(client):
    r = client.post("/api/sample", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/sample", content=b" " * 5000)
    assert r.status_code == 413
    for path in ("/api/result/0123456789abcdef.png", "/api/result/x.npz",
                 "/api/result/..%2F..%2Fetc%2Fpasswd.png", "/api/result/0123456789abcdef.txt"):
        assert client.get(path).status_code == 404, path


def test_a_full_queue_is_503_and_frees_up(playground, client):
    held = [playground.admit() for _ in range(playground.limits.max_queue)]
    try:
        assert all(held)
        r = client.post("/api/sample", json=dict(model="fashion-small", steps=2))
        assert r.status_code == 503 and "busy" in r.json()["error"]
    finally:
        for _ in held:
            playground.release()
    assert stream(client, dict(model="fashion-small", steps=2))[-1]["event"] == "done"


def test_a_cancelled_job_stops_and_keeps_nothing(playground):
    before = dict(playground.results)
    with pytest.raises(Cancelled):
        playground.run(Job("fashion-small", "ddim", 5), cancelled=lambda: True)
    assert playground.results == before


def test_an_upsampler_or_a_duplicate_name_is_refused(tmp_path):
    with pytest.raises(UsageError, match="upsampler"):
        Playground([os.path.join(ROOT, "models", "fashion-up28")], device="cpu")
    with pytest.raises(UsageError, match="two models are named"):
        Playground([SMALL, SMALL + "/"], device="cpu")


def test_cli_limits_are_checked(tmp_path):
    r = run_cli("serve", SMALL, "--max-nfe", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--max-nfe" in r.stderr
