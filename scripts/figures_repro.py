"""Figures and the markdown table of scripts/reproduce.py, from the point JSONs present."""
from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from statistics import mean, stdev


def load(out: str):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "*.json")))]


def _spread(values):
    return f"{mean(values):.2f} ± {stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(records) -> str:
    """The headline rows (mean ± std over seeds) and every point, as markdown."""
    rows = ["| row | samples | FID (mean ± std over seeds) | seeds |", "|---|---|---|---|"]
    head = defaultdict(list)
    for r in records:
        if r["tags"].get("group") == "headline":
            head[r["name"].rsplit("-s", 1)[0]].append(r)
    for name, rs in head.items():
        rows.append(f"| {name} | {rs[0]['num']} | {_spread([r['metrics']['fid'] for r in rs])} | {len(rs)} |")
    rows += ["", "| point | samples | metrics | sample command |", "|---|---|---|---|"]
    for r in records:
        if r["tags"].get("group") != "headline":
            m = ", ".join(f"{k} {v:.3g}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
            rows.append(f"| {r['name']} | {r['num']} | {m} | `{r['sample_command']}` |")
    return "\n".join(rows) + "\n"


def draw(out: str, docs: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = load(out)
    if not records:
        print(f"no points in {out} yet")
        return
    os.makedirs(docs, exist_ok=True)
    tmp = os.path.join(out, "table.md.tmp")
    with open(tmp, "w") as f:
        f.write(table(records))
    os.replace(tmp, os.path.join(out, "table.md"))
    groups = defaultdict(list)
    for r in records:
        groups[r["tags"].get("group")].append(r)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(docs, name), dpi=110)
        plt.close(fig)

    if groups["fig2"]:   # EDM Fig. 2: FID against NFE, one panel per model
        models = sorted({r["tags"]["model"] for r in groups["fig2"]})
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            curves = defaultdict(list)
            for r in groups["fig2"]:
                if r["tags"]["model"] == model:
                    curves[r["tags"]["sampler"]].append((r["tags"]["nfe"], r["metrics"]["fid"]))
            for sampler, pts in sorted(curves.items()):
                pts.sort()
                ax.plot(*zip(*pts), marker="o", label=sampler)
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID", title=f"{model} model")
            ax.legend()
        save(fig, "fig2-fid-vs-nfe.png")
    for group, key, xlabel, fname in (("fig4", "churn", "S_churn", "fig4-churn.png"),):
        if groups[group]:
            pts = sorted((r["tags"][key], r["metrics"]["fid"]) for r in groups[group])
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.plot(*zip(*pts), marker="o")
            ax.set(xlabel=xlabel, ylabel="FID", title="fashion-small, Heun 35 NFE, EDM Algorithm 2")
            save(fig, fname)
    if groups["fig8"]:
        curves = defaultdict(list)
        for r in groups["fig8"]:
            curves[r["tags"]["variant"]].append((r["tags"]["steps"], r["metrics"]["fid"]))
        fig, ax = plt.subplots(figsize=(5, 4))
        for variant, pts in sorted(curves.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set(xscale="log", xlabel="sampling steps", ylabel="FID", title="Improved DDPM Fig. 8")
        ax.legend()
        save(fig, "fig8-respacing.png")
    for group, title in (("fig6-classifier", "classifier scale"), ("fig6-cfg", "CFG weight w")):
        if groups[group]:
            rs = sorted(groups[group], key=lambda r: r["tags"]["scale"])
            names = [k for k in rs[0]["metrics"] if isinstance(rs[0]["metrics"][k], (int, float))]
            fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
            for ax, k in zip(axes[0], names):
                ax.plot([r["tags"]["scale"] for r in rs], [r["metrics"][k] for r in rs], marker="o")
                ax.set(xlabel=title, title=k)
            save(fig, f"{group}.png")
