"""The seeds' sampling claims at this scale (issue 11): every FID point, resumable.

    python scripts/reproduce.py [--num 2000] [--only REGEX] [--list] [--figures]

Protocol: N = 2,000 samples per point scored by `gaussdiff eval` against the Inception
statistics of the whole Fashion-MNIST test set (10,000 images; shipped in results/reference/,
else computed on first use, ~35 min on 2 cores, and cached), fp32 features. The floor is N real
training images against the same statistics. The headline rows are repeated over seeds 0, 1, 2
(the floor over three disjoint sets of training images), except DDPM with 1,000 steps: one
seed (2,000 x 1,000 network evaluations, ~2 h on 2 cores; `--ddpm-seeds 3` for all three);
the spread of the other rows over seeds is the noise level its comparison is read against.

Each point runs `gaussdiff sample ... --out WORK/NAME.npz` (sharded, so an interrupted point
resumes its shards) and `gaussdiff eval ... --out OUT/NAME.json`; a point whose JSON exists is
skipped, so the script can be stopped and restarted at any time, across sessions (shards of
250 images; `--work wip/repro` keeps them in the repository when a point spans sessions). Every JSON
records the two command lines and the machine. `--figures` writes docs/repro/*.png and
OUT/table.md from the JSONs present. Points run in the order listed (`--list`): headline rows
first, then the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = [sys.executable, "-m", "gaussdiff"]
SMALL, EDM, CLS = "models/fashion-small", "models/fashion-cond-edm", "models/fashion-classifier"
FEATURE_NET = "models/fashion-feature-net"   # the data classifier behind IS (is_NAME)
REF = ["--ref", "fashion-mnist", "--ref-split", "test", "--ref-num", "10000"]
SHIPPED = os.path.join(ROOT, "results", "reference")   # compact FID statistics kept in git
REF_GLOB = "ref-fashion-mnist-test-inception-10000-*.npz"


def heun_steps(nfe: int) -> int:
    return (nfe + 1) // 2


def points(num: int, headline_num: int, ddpm_seeds: int = 1):
    """(name, sample args or None for real data, eval metrics, num, tags) in run order."""
    P = []

    def add(name, sample, num=num, metrics="fid", **tags):
        P.append(dict(name=name, sample=sample, metrics=metrics, num=num, tags=tags))

    # headline rows: the floor, DDPM 1000 and Heun 35 on fashion-small (v-prediction, learned Σ), Heun 35 on the EDM model
    for seed in (0, 1, 2):
        add(f"floor-train-s{seed}", None, headline_num, group="headline", seed=seed)
        add(f"small-heun35-s{seed}", [SMALL, "--sampler", "heun", "--steps", "18", "--seed", str(seed)],
            headline_num, group="headline", seed=seed)
        add(f"edm-heun35-s{seed}", [EDM, "--sampler", "heun", "--steps", "18", "--seed", str(seed)],
            headline_num, group="headline", seed=seed)
        if seed < ddpm_seeds:
            add(f"small-ddpm1000-s{seed}", [SMALL, "--sampler", "ddpm", "--steps", "1000", "--seed", str(seed)],
                headline_num, group="headline", seed=seed)
    # EDM Fig. 2: FID against NFE per sampler, on both models
    for nfe in (10, 20, 35, 50, 100):
        for model, tag in ((SMALL, "small"), (EDM, "edm")):
            for sampler in ("euler", "heun", "dpmpp_2m", "ddim" if tag == "small" else "ddim_sigma",
                            "ddpm" if tag == "small" else "euler_ancestral"):
                steps = heun_steps(nfe) if sampler == "heun" else nfe
                actual = 2 * steps - 1 if sampler == "heun" else nfe   # heun: 2N − 1 evaluations
                add(f"fig2-{tag}-{sampler}-{actual}", [model, "--sampler", sampler, "--steps", str(steps)],
                    group="fig2", model=tag, sampler=sampler, nfe=actual)
    # EDM Fig. 4: the stochastic sampler against the deterministic one, fashion-small, Heun 35 NFE
    for churn in (0, 5, 10, 20, 40, 80):
        add(f"fig4-churn{churn}", [SMALL, "--sampler", "heun", "--steps", "18", "--churn", str(churn),
                                   "--tmin", "0.05", "--tmax", "50", "--snoise", "1.003"],
            group="fig4", churn=churn)
    # Improved DDPM Fig. 8: respaced DDPM with learned Σ, fixed Σ (both) and DDIM
    for steps in (25, 50, 100, 250):
        for variant, extra in (("learned", []), ("fixed_small", ["--var-type", "fixed_small"]),
                               ("fixed_large", ["--var-type", "fixed_large"])):
            add(f"fig8-ddpm-{variant}-{steps}", [SMALL, "--sampler", "ddpm", "--steps", str(steps)] + extra,
                group="fig8", variant=f"ddpm {variant}", steps=steps)
        add(f"fig8-ddim-{steps}", [SMALL, "--sampler", "ddim", "--steps", str(steps)],
            group="fig8", variant="ddim", steps=steps)
    # ADM Tables 15-16: the sweep's best five-section schedule (90,60,60,20,20 steps over the five
    # fifths of t, t = 0 first) against uniform spacing at 250 steps, and the same proportions
    # at 50 steps; DDPM, as ADM sampled its LSUN models
    for steps, sections in ((50, "18,12,12,4,4"), (250, "90,60,60,20,20")):
        add(f"adm-uniform-{steps}", [SMALL, "--sampler", "ddpm", "--steps", str(steps)],
            group="adm-sections", steps=steps, spacing="uniform")
        add(f"adm-sections-{steps}", [SMALL, "--sampler", "ddpm", "--steps", sections],
            group="adm-sections", steps=steps, spacing=sections)
    # ADM Fig. 6: classifier-guidance scale; classifier-free weight on the EDM model
    gm = "fid,prec,rec,is"
    for scale in (0, 1, 2, 4, 8):
        add(f"fig6-classifier-{scale}", [SMALL, "--sampler", "ddpm", "--steps", "100", "--classifier", CLS,
                                          "--classifier-scale", str(scale)],
            metrics=gm, group="fig6-classifier", scale=scale)
    for w in (1, 1.5, 2, 3, 4):
        add(f"fig6-cfg-{w}", [EDM, "--sampler", "heun", "--steps", "18", "--cfg-scale", str(w)],
            metrics=gm, group="fig6-cfg", scale=w)
    return P


def machine() -> str:
    from gaussdiff.training.precision import cpu_description
    return f"{cpu_description()}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}"


def cache_dir() -> str:
    from gaussdiff.metrics.evaluate import default_cache_dir
    return default_cache_dir()


def install_shipped():
    """Copy the shipped FID statistics into the cache, where `gaussdiff eval` looks (it checks
    the key inside: images, network and count must match, else it recomputes)."""
    import glob
    import shutil
    for src in glob.glob(os.path.join(SHIPPED, "*.npz")):
        dest = os.path.join(cache_dir(), os.path.basename(src))
        if not os.path.exists(dest):
            os.makedirs(cache_dir(), exist_ok=True)
            shutil.copyfile(src, dest + ".tmp")
            os.replace(dest + ".tmp", dest)


def ship_reference():
    """Write the compact (FID-only, float32) copy of the cached 10k test-set statistics to
    results/reference/ (about 17 MB: no recomputation, ~35 min on 2 cores, on a new machine)."""
    import glob
    import numpy as np
    from gaussdiff.metrics.evaluate import compact_reference
    found = [f for f in glob.glob(os.path.join(cache_dir(), REF_GLOB))
             if "pool_features" in np.load(f).files]
    if not found:
        sys.exit(f"no full {REF_GLOB} in {cache_dir()}: run a point first")
    os.makedirs(SHIPPED, exist_ok=True)
    print("wrote", compact_reference(found[0], SHIPPED, ("pool_mu", "pool_sigma"), np.float32))


def run(cmd):
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def do_point(p, out: str, work: str):
    dest = os.path.join(out, p["name"] + ".json")
    if os.path.exists(dest):
        return False
    samples = os.path.join(work, p["name"] + ".npz")
    started = time.time()
    if p["sample"] is None:   # the floor: real training images
        seed = p["tags"]["seed"]
        sample_cmd = ["<first>", str(p["num"]), "training images from index", str(seed * p["num"])]
        if not os.path.exists(samples):
            import numpy as np
            from gaussdiff.data import load_dataset
            images = load_dataset("fashion-mnist", "train").images
            np.savez(samples + ".tmp.npz", images[seed * p["num"]:(seed + 1) * p["num"]])
            os.replace(samples + ".tmp.npz", samples)
    else:
        sample_cmd = G + ["sample"] + p["sample"] + ["--num", str(p["num"]), "--out", samples,
                                                     "--shard-size", "250", "--no-progress"]
        if not os.path.exists(samples):
            run(sample_cmd)
    sampled = time.time()
    eval_cmd = G + ["eval", samples] + REF + ["--metrics", p["metrics"], "--no-progress"]
    if "is" in p["metrics"].split(","):
        eval_cmd += ["--feature-net", FEATURE_NET]
    result = subprocess.run(eval_cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    record = dict(name=p["name"], tags=p["tags"], num=p["num"], metrics=json.loads(result.stdout)["metrics"],
                  sample_command=" ".join(["gaussdiff"] + sample_cmd[3:]) if p["sample"] else " ".join(sample_cmd),
                  eval_command=" ".join(["gaussdiff"] + eval_cmd[3:]), machine=machine(),
                  seconds=dict(sample=round(sampled - started, 1), eval=round(time.time() - sampled, 1)))
    tmp = dest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, dest)
    print(p["name"], record["metrics"], flush=True)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=2000, help="samples per figure point (2000)")
    ap.add_argument("--headline-num", type=int, default=2000, help="samples per headline row (2000)")
    ap.add_argument("--ddpm-seeds", type=int, default=1, choices=(1, 2, 3),
                    help="seeds of the DDPM 1,000-step headline row (1: seed 0)")
    ap.add_argument("--only", default="", help="run only the points whose name matches this regex")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "repro"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("GAUSSDIFF_CACHE", os.path.expanduser(
        "~/.cache/gaussdiff")), "repro"), help="samples (not committed)")
    ap.add_argument("--list", action="store_true", help="print the points and whether each is done")
    ap.add_argument("--figures", action="store_true", help="only draw the figures and the table")
    ap.add_argument("--ship-reference", action="store_true",
                    help="write the compact 10k test-set FID statistics to results/reference/")
    args = ap.parse_args(argv)
    if args.ship_reference:
        return ship_reference()
    install_shipped()
    todo = [p for p in points(args.num, args.headline_num, args.ddpm_seeds) if re.search(args.only, p["name"])]
    if args.list:
        for p in todo:
            done = os.path.exists(os.path.join(args.out, p["name"] + ".json"))
            print(("done " if done else "     ") + p["name"])
        return
    if not args.figures:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        for p in todo:
            do_point(p, args.out, args.work)
    from figures_repro import draw   # noqa: E402 (scripts/ is on sys.path when run as a script)
    draw(args.out, os.path.join(ROOT, "docs", "repro"))


if __name__ == "__main__":
    main()
