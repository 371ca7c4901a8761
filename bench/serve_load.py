"""A bounded load test of `gaussdiff serve` on the loopback address; prints JSON.

    python bench/serve_load.py [--model models/fashion-small] [--concurrent 50] [--malformed 200]
                               [--rounds 2]

Starts the server in a subprocess, warms it up, then per round sends --concurrent valid sample
requests at once (DDIM, 3 steps, seed i, 1 or 2 images) together with --malformed bad ones (not
JSON, unknown fields, out-of-range values, wrong types, an oversized body, unknown results,
paths that try to leave the API, a client that hangs up mid-stream). Checks that the server is
still up, that every valid request got its result and that each result equals the images
`Pipeline.sample` draws alone for the same request, bit for bit, that every malformed one got a
JSON 4xx; records the server's resident memory after the warm-up and after each round.
tests/test_serve_load.py runs it and checks those figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gaussdiff  # noqa: E402
from gaussdiff.training.precision import cpu_description  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def post(url, body: bytes, timeout=600):
    req = urllib.request.Request(url + "/api/sample", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url, path, timeout=60):
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def valid_request(i: int) -> dict:
    return dict(model="fashion-small", sampler="ddim", steps=3, seed=i, num=1 + i % 2)


def run_valid(url, i):
    """(i, images or None, what went wrong)"""
    status, body = post(url, json.dumps(valid_request(i)).encode())
    if status != 200:
        return i, None, f"status {status}"
    events = [json.loads(line) for line in body.decode().splitlines()]
    done = events[-1]
    if done.get("event") != "done":
        return i, None, f"last event {done}"
    status, npz = get(url, done["npz"])
    if status != 200:
        return i, None, f"result status {status}"
    with np.load(io.BytesIO(npz)) as z:
        return i, z["arr_0"], None


def malformed_requests(n: int, rng: random.Random):
    kinds = [
        ("not-json", lambda: (b"{nope", None)),
        ("unknown-field", lambda: (json.dumps(dict(model="fashion-small", path="/etc/passwd")).encode(), None)),
        ("bad-model", lambda: (json.dumps(dict(model="../../etc")).encode(), None)),
        ("too-many-steps", lambda: (json.dumps(dict(model="fashion-small", steps=10 ** 6)).encode(), None)),
        ("negative-seed", lambda: (json.dumps(dict(model="fashion-small", seed=-5)).encode(), None)),
        ("too-many-images", lambda: (json.dumps(dict(model="fashion-small", num=10 ** 4)).encode(), None)),
        ("wrong-type", lambda: (json.dumps(dict(model="fashion-small", steps="ten")).encode(), None)),
        ("nan", lambda: (b'{"model": "fashion-small", "temperature": NaN}', None)),
        ("oversized", lambda: (b"[" + b"1," * 50000 + b"1]", None)),
        ("array", lambda: (b"[1, 2, 3]", None)),
        ("unknown-result", lambda: (None, "/api/result/0123456789abcdef.npz")),
        ("escape-result", lambda: (None, "/api/result/..%2F..%2Fetc%2Fpasswd.png")),
        ("escape-path", lambda: (None, "/../../etc/passwd")),
    ]
    return [kinds[rng.randrange(len(kinds))] for _ in range(n)]


def run_malformed(url, kind, make):
    body, path = make()
    status, raw = post(url, body) if body is not None else get(url, path)
    is_json = True
    try:
        json.loads(raw)
    except ValueError:
        is_json = False
    return kind, status, is_json


def hang_up(url):
    """A client that starts a valid request and closes the connection after the first line."""
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(dict(model="fashion-small", sampler="ddim", steps=20, seed=999)).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        s.recv(256)
    return "hang-up"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "fashion-small"))
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--malformed", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gaussdiff", "serve", args.model, "--port", str(port),
                               "--max-queue", str(args.concurrent + 8), "--max-images", "2"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        for _ in range(1200):
            try:
                get(url, "/api/models", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read()}")
                time.sleep(0.1)
        pipe = gaussdiff.load(args.model, device="cpu")
        expected = {}

        def want(i):
            if i not in expected:
                r = valid_request(i)
                expected[i], _ = pipe.sample(r["num"], "ddim", 3, seed=i, progress=False)
            return expected[i]
        for i in range(3):   # warm-up
            run_valid(url, 10_000 + i)
        rss = [rss_mb(server.pid)]
        rng = random.Random(0)
        rounds = []
        for k in range(args.rounds):
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.concurrent + 16) as pool:
                valid = [pool.submit(run_valid, url, k * args.concurrent + i) for i in range(args.concurrent)]
                bad = [pool.submit(run_malformed, url, kind, make)
                       for kind, make in malformed_requests(args.malformed, rng)]
                hung = [pool.submit(hang_up, url) for _ in range(3)]
                results = [f.result() for f in valid]
                bad_results = [f.result() for f in bad]
                [f.result() for f in hung]
            seconds = time.perf_counter() - start
            time.sleep(1.0)   # the hung-up jobs stop at their next step
            rss.append(rss_mb(server.pid))
            failures = [(i, why) for i, images, why in results if images is None]
            mismatches = [i for i, images, why in results
                          if images is not None and not np.array_equal(images, want(i))]
            statuses = Counter(status for _, status, _ in bad_results)
            rounds.append(dict(
                valid=len(results), valid_ok=len(results) - len(failures), failures=failures[:5],
                mismatches=mismatches, malformed=len(bad_results),
                malformed_statuses={str(k): v for k, v in sorted(statuses.items())},
                malformed_not_4xx=sum(not 400 <= s < 500 for _, s, _ in bad_results),
                malformed_not_json=sum(not j for _, _, j in bad_results),
                hung_up=len(hung), seconds=round(seconds, 2)))
        alive = server.poll() is None and get(url, "/api/models")[0] == 200
        print(json.dumps(dict(cpu=cpu_description(), threads=os.environ.get("OMP_NUM_THREADS", "1"),
                              server_alive=alive, rss_mb_after_warmup=round(rss[0], 1),
                              rss_mb_after_round=[round(r, 1) for r in rss[1:]], rounds=rounds),
                         indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
