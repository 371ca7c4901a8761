"""The bounded load test of `gaussdiff serve` (bench/serve_load.py, whose figures the README
reports): 50 concurrent valid requests with 200 malformed ones and 3 clients that hang up, two
rounds. No crash, every valid request answered with exactly the images `Pipeline.sample` draws
alone for it, every malformed one a JSON 4xx, and no memory growth from one round to the next."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve_load.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["server_alive"]
    for rnd in out["rounds"]:
        assert rnd["valid_ok"] == rnd["valid"] == 50, rnd["failures"]
        assert rnd["mismatches"] == []
        assert rnd["malformed"] == 200 and rnd["malformed_not_4xx"] == 0 and rnd["malformed_not_json"] == 0
    first, second = out["rss_mb_after_round"]
    # the second round, identical in size, finds the memory the first one left: no leak per request
    assert second <= first + 16, out["rss_mb_after_round"]
