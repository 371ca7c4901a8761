"""The seeds' training objectives compared at equal compute (issue 12), every stage resumable.

    python scripts/objectives.py [--list] [--only REGEX] [--steps 3000] [--num 2000]

Every run trains the bundled network (preset fashion-small: the 1.19M-parameter ADM UNet) on
the 60k Fashion-MNIST training images with batch 64, lr 5e-4 after 200 warm-up steps, EMA
0.999 with warm-up, seed 0 and --steps S at the fastest precision the CPU has (--precision
auto); the runs differ only in the objective flags of RUNS (and hybrid-cosine-fp32 in its precision
alone: issue 15's check that bf16 autocast trains the same model). Stages, in this order for each run:

- train: `gaussdiff train ... --out wip/objectives/NAME` (resumable with --resume: a stopped
  stage continues where its last checkpoint was; `wip/` is committed between sessions);
- nll (the DDPM family): VLB in bits/dim over all T steps on the first --nll-num (1,000) test
  images, with its standard error (`gaussdiff nll`);
- fid-heun35: FID of --num samples from EDM's Heun sampler at 35 NFE (the fixed sampler, for
  every run), against the 10k test-set statistics (scripts/reproduce.py's protocol);
- best: each candidate sampler of the run's family scored by FD in the space of the bundled
  Fashion-MNIST classifier on 1,000 samples (cheap), then the best one's FID on --num samples.

Each stage writes results/objectives/NAME.STAGE.json (its command, machine and numbers) and is
skipped when that file exists. `--table` writes results/objectives/table.md and the bar chart
docs/objectives.png from them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce import FEATURE_NET, G, REF, ROOT, install_shipped, machine, run  # noqa: E402

BASE = ["--preset", "fashion-small", "--mean-type", "eps", "--ema", "0.999", "--ema-warmup", "true",
        "--seed", "0", "--precision", "auto", "--save-every", "500", "--keep", "1",
        "--sample-every", "1000", "--log-every", "100", "--no-progress"]
# name: (flags, family). Improved DDPM Table 1 / Fig. 6; P2 and Min-SNR on the hybrid baseline;
# EDM Table 2 in spirit: VP baseline, + EDM preconditioning, + its loss (log-normal σ, λ(σ)),
# + non-leaky augmentation.
RUNS = {
    "simple-linear": (["--schedule", "linear", "--var-type", "fixed_large", "--loss", "mse"], "ddpm"),
    "simple-cosine": (["--schedule", "cosine", "--var-type", "fixed_large", "--loss", "mse"], "ddpm"),
    "hybrid-linear": (["--schedule", "linear", "--var-type", "learned_range", "--loss", "hybrid"], "ddpm"),
    "hybrid-cosine": (["--schedule", "cosine", "--var-type", "learned_range", "--loss", "hybrid"], "ddpm"),
    "vlb-cosine": (["--schedule", "cosine", "--var-type", "learned_range", "--loss", "kl",
                    "--schedule-sampler", "loss-second-moment"], "ddpm"),
    "hybrid-cosine-p2": (["--schedule", "cosine", "--var-type", "learned_range", "--loss", "hybrid",
                          "--p2-gamma", "1", "--p2-k", "1"], "ddpm"),
    "hybrid-cosine-minsnr5": (["--schedule", "cosine", "--var-type", "learned_range", "--loss", "hybrid",
                               "--min-snr-gamma", "5"], "ddpm"),
    "vp": (["--objective", "vp"], "sigma"),
    "vp-edm-precond": (["--objective", "vp", "--precond", "edm"], "sigma"),
    "edm": (["--objective", "edm"], "sigma"),
    "edm-augment": (["--objective", "edm", "--augment", "0.12"], "sigma"),
}
# Issue 15's check that --precision auto changes nothing but the speed: the hybrid-cosine run again
# in fp32 (on a CPU with native bf16, hybrid-cosine itself runs under bf16 autocast; the log
# records which), compared by loss curve and FID at Heun 35 NFE.
TWINS = ("hybrid-cosine-fp32",)   # trained and scored at the fixed sampler only
RUNS["hybrid-cosine-fp32"] = (RUNS["hybrid-cosine"][0] + ["--precision", "fp32"], "ddpm")
# The claims' runs get the NLL: hybrid and vlb against simple, cosine against linear.
NLL_RUNS = ("simple-linear", "simple-cosine", "hybrid-linear", "hybrid-cosine", "vlb-cosine")
FIXED = ["--sampler", "heun", "--steps", "18"]   # 35 NFE
CANDIDATES = {   # the best-sampler search per family (sampler flags, name)
    "ddpm": [(["--sampler", "ddpm", "--steps", "100"], "ddpm-100"),
             (["--sampler", "ddpm", "--steps", "250"], "ddpm-250"),
             (FIXED, "heun-35"),
             (FIXED + ["--churn", "40", "--tmin", "0.05", "--tmax", "50", "--snoise", "1.003"], "heun-35-churn40"),
             (["--sampler", "euler_ancestral", "--steps", "35"], "euler-ancestral-35")],
    "sigma": [(FIXED, "heun-35"),
              (FIXED + ["--churn", "40", "--tmin", "0.05", "--tmax", "50", "--snoise", "1.003"], "heun-35-churn40"),
              (["--sampler", "euler_ancestral", "--steps", "35"], "euler-ancestral-35"),
              (["--sampler", "dpmpp_2m", "--steps", "20"], "dpmpp-2m-20")],
}
SELECT_NUM = 1000


def write_json(path: str, record: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def output(cmd) -> dict:
    print("+", " ".join(cmd), flush=True)
    return json.loads(subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout)


def run_dir(name: str) -> str:
    return os.path.join("wip", "objectives", name)


def trained_model(name: str) -> str:
    """The run's newest checkpoint: a model directory (config + EMA weights) that git keeps, unlike
    the run's top-level weight copies, so the later stages run from a fresh clone too."""
    ckpts = os.path.join(run_dir(name), "checkpoints")
    return os.path.join(ckpts, max(os.listdir(os.path.join(ROOT, ckpts))))


def train(name: str, steps: int) -> dict:
    flags, _ = RUNS[name]
    cmd = G + ["train"] + BASE + flags + ["--steps", str(steps), "--out", run_dir(name)]
    if os.path.exists(os.path.join(ROOT, run_dir(name), "checkpoints")):
        cmd.append("--resume")
    started = time.time()
    run(cmd)
    with open(os.path.join(ROOT, run_dir(name), "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return dict(command=" ".join(["gaussdiff"] + cmd[3:]), seconds_this_sitting=round(time.time() - started),
                last_log=log[-1])


def sample_and_score(name: str, sampler: list, tag: str, num: int, metrics: str, work: str) -> dict:
    samples = os.path.join(work, f"{name}.{tag}.{num}.npz")
    sample_cmd = G + ["sample", trained_model(name), "--ema", "0.999"] + sampler + [
        "--num", str(num), "--seed", "0", "--out", samples, "--no-progress"]
    started = time.time()
    if not os.path.exists(samples):
        run(sample_cmd)
    sampled = time.time()
    eval_cmd = G + ["eval", samples] + REF + ["--metrics", metrics, "--no-progress"]
    if "fd" in metrics.split(","):
        eval_cmd += ["--feature-net", FEATURE_NET]
    result = output(eval_cmd)
    return dict(sampler=tag, num=num, metrics=result["metrics"],
                sample_command=" ".join(["gaussdiff"] + sample_cmd[3:]),
                eval_command=" ".join(["gaussdiff"] + eval_cmd[3:]),
                seconds=dict(sample=round(sampled - started), eval=round(time.time() - sampled)))


def stages(name: str):
    if name in TWINS:
        return ["train", "fid-heun35"]
    return ["train"] + (["nll"] if name in NLL_RUNS else []) + ["fid-heun35", "best"]


def do_stage(name: str, stage: str, args) -> dict:
    if stage == "train":
        return train(name, args.steps)
    if stage == "nll":
        cmd = G + ["nll", trained_model(name), "--ema", "0.999", "--split", "test", "--num", str(args.nll_num),
                   "--no-progress"]
        return dict(command=" ".join(["gaussdiff"] + cmd[3:]), result=output(cmd))
    if stage == "fid-heun35":
        return sample_and_score(name, FIXED, "heun-35", args.num, "fid", args.work)
    scores = {}
    for sampler, tag in CANDIDATES[RUNS[name][1]]:
        scores[tag] = sample_and_score(name, sampler, tag, SELECT_NUM, "fd", args.work)
    best = min(scores, key=lambda t: scores[t]["metrics"]["fd_fashion"])
    flags = dict((tag, s) for s, tag in CANDIDATES[RUNS[name][1]])[best]
    return dict(selection=scores, best=best,
                fid=sample_and_score(name, flags, best, args.num, "fid", args.work))


def table(out: str) -> str:
    """results/objectives/table.md from the stage records present (a dash where one is missing)."""
    def load(name, stage):
        path = os.path.join(out, f"{name}.{stage}.json")
        return json.load(open(path)) if os.path.exists(path) else None
    rows = ["| run | objective flags | precision | NLL (bits/dim, VLB) | FID, Heun 35 NFE | best sampler (FD) | its FID |",
            "|---|---|---|---|---|---|---|"]
    for name, (flags, _) in RUNS.items():
        trained, nll, fixed, best = (load(name, s) for s in ("train", "nll", "fid-heun35", "best"))
        cells = [name, " ".join(flags), trained["last_log"].get("precision", "?") if trained else "—",
                 f"{nll['result']['bpd']['mean']:.3f} ± {nll['result']['bpd']['stderr']:.3f}" if nll else "—",
                 f"{fixed['metrics']['fid']:.1f}" if fixed else "—",
                 best["best"] if best else "—", f"{best['fid']['metrics']['fid']:.1f}" if best else "—"]
        rows.append("| " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n"
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "table.md"), text)
    return text


def bar_chart(out: str, path: str):
    """The README's bar chart: FID at Heun 35 NFE and at the best sampler per run, and the NLL of
    the runs that have one (the records present; nothing when none is)."""
    from gaussdiff.plot import new_figure, save_figure

    def value(name, stage, get):
        f = os.path.join(out, f"{name}.{stage}.json")
        return get(json.load(open(f))) if os.path.exists(f) else None
    names = [n for n in RUNS if value(n, "fid-heun35", lambda r: 1)]
    if not names:
        return None
    fig, (ax, ax2) = new_figure(2)
    x = list(range(len(names)))
    fixed = [value(n, "fid-heun35", lambda r: r["metrics"]["fid"]) for n in names]
    best = [value(n, "best", lambda r: r["fid"]["metrics"]["fid"]) or 0 for n in names]
    ax.bar([i - 0.2 for i in x], fixed, 0.4, label="Heun 35 NFE")
    ax.bar([i + 0.2 for i in x], best, 0.4, label="best sampler")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("FID (against the 10k test set)")
    ax.legend(fontsize=7)
    nll = [(n, value(n, "nll", lambda r: r["result"]["bpd"])) for n in NLL_RUNS]
    nll = [(n, b) for n, b in nll if b]
    ax2.bar(range(len(nll)), [b["mean"] for _, b in nll], 0.5, yerr=[b["stderr"] for _, b in nll])
    ax2.set_xticks(range(len(nll)), [n for n, _ in nll], rotation=30, ha="right", fontsize=7)
    ax2.set_ylabel("NLL, VLB (bits/dim)")
    save_figure(fig, path)
    return path


def write_text(path: str, text: str):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="training steps of every run (3000)")
    ap.add_argument("--num", type=int, default=2000, help="samples per FID (2000)")
    ap.add_argument("--nll-num", type=int, default=1000, help="test images for the NLL (1000)")
    ap.add_argument("--only", default="", help="only the stages NAME.STAGE matching this regex")
    ap.add_argument("--list", action="store_true", help="print the stages and whether each is done")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "objectives"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("GAUSSDIFF_CACHE", os.path.expanduser(
        "~/.cache/gaussdiff")), "objectives"), help="samples (not committed)")
    ap.add_argument("--table", action="store_true", help="only write OUT/table.md from the records")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out), end="")
        return bar_chart(args.out, os.path.join(ROOT, "docs", "objectives.png"))
    todo = [(n, s) for n in RUNS for s in stages(n) if re.search(args.only, f"{n}.{s}")]
    if args.list:
        for n, s in todo:
            done = os.path.exists(os.path.join(args.out, f"{n}.{s}.json"))
            print(("done " if done else "     ") + f"{n}.{s}")
        return
    install_shipped()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    for n, s in todo:
        dest = os.path.join(args.out, f"{n}.{s}.json")
        if os.path.exists(dest):
            continue
        if s != "train" and not os.path.exists(os.path.join(args.out, f"{n}.train.json")):
            continue   # evaluate only finished runs
        record = dict(run=n, stage=s, flags=RUNS[n][0], machine=machine(), **do_stage(n, s, args))
        write_json(dest, record)
        print(f"{n}.{s} done", flush=True)
    table(args.out)
    bar_chart(args.out, os.path.join(ROOT, "docs", "objectives.png"))


if __name__ == "__main__":
    main()
