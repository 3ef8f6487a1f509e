"""Accuracy against K per method, from a tools/bench_paper.py JSON (PNG next to it).

    python tools/plot_paper.py results/paper_vgg16.json     # writes results/paper_vgg16.png

Needs matplotlib (`pip install -e ".[bench]"`); nothing else in the project does.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, help="default: the JSON's path with .png")
    p.add_argument("--floor", type=float, default=80.0, help="lowest accuracy shown (l1 collapses to 10%%)")
    args = p.parse_args()
    data = json.loads(args.results.read_text())
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=120)
    colours = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["shots"])
        if len(sel) < 3:  # the mu sweep and pgd run at a few K only: in the table, not the plot
            continue
        ks = [r["shots"] for r in sel]
        mean = [r["accuracy_mean"] for r in sel]
        std = [r["accuracy_std"] for r in sel]
        if max(mean) < args.floor:
            ax.plot([], [], label=f"{variant} (≈{mean[0]:.0f}%, below the axis)")
            continue
        base = variant.replace(" +ft", "")
        line = ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=variant, color=colours.get(base),
                           linestyle="--" if variant.endswith("+ft") else "-", alpha=0.6 if variant.endswith("+ft") else 1)
        colours.setdefault(base, line.lines[0].get_color())
    ax.axhline(rows[0]["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["shots"] for r in rows}), labels=[str(k) for k in sorted({r["shots"] for r in rows})])
    ax.set_ylim(args.floor, rows[0]["teacher_accuracy"] + 0.6)
    ax.set_xlabel("samples per class (K)")
    ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    ax.set_title(f"{data['net']}: keep ratio {data['ratio']}, {data['eval_count']} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = args.out or args.results.with_suffix(".png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
