"""`make demo`: sample from the bundled Fashion-MNIST model, then show a short training run.

Writes demo-out/samples.png (64 images from models/fashion-small: ancestral sampling on 100
respaced steps with the learned variances, Improved DDPM's fast sampler) and
demo-out/train/ (a 100-step training run with a progress bar and a falling loss).
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "demo-out")
MODEL = os.path.join(ROOT, "models", "fashion-small")


def run(args):
    print("$ gaussdiff " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "gaussdiff", *args], check=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    run(["sample", MODEL, "--num", "64", "--sampler", "ddpm", "--steps", "100", "--seed", "0",
         "--grid", os.path.join(OUT, "samples.png"), "--out", os.path.join(OUT, "samples.npz")])
    print(f"sampled 64 images in {time.time() - t0:.0f} s -> demo-out/samples.png\n", flush=True)

    train_dir = os.path.join(OUT, "train")
    if os.path.exists(train_dir):
        import shutil
        shutil.rmtree(train_dir)
    # A short run of the small CPU preset, L_simple only so the printed loss is easy to read.
    run(["train", "--preset", "fashion-small", "--out", train_dir, "--steps", "100",
         "--loss", "mse", "--var-type", "fixed_small", "--warmup", "0", "--lr", "1e-3",
         "--log-every", "10", "--save-every", "100", "--sample-every", "0"])
    with open(os.path.join(train_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    print("step  loss")
    for rec in log:
        print(f"{rec['step']:4d}  {rec['loss']:.4f}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s: demo-out/samples.png, demo-out/train/")


if __name__ == "__main__":
    main()
