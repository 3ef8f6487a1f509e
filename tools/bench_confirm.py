"""Do the refinement's confirmation scores tell which refined widths are better on test images?

For every row of earlier `tools/bench_target.py` outputs whose refinement moved away from one
ratio for all (and kept the move), both widths (start and refined) are pruned from the same shots
and scored three ways: on a second random split of the shots (what confirmed them before), on the
folds of the search's own split that it never scored on (what confirms them now,
`choose.unseen_scores`), and on the test images (relative squared output error, top-1 agreement
with the teacher, accuracy). A confirmation is right when it prefers the widths the test images
prefer by relative error; accuracy differences of a few tenths are within the noise of 2,000
images. Nothing is timed.

    python tools/bench_confirm.py results/target.json results/target_seeds.json    # tools/bench_target.py outputs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from pipeline import choose, convert, prune, workflow  # noqa: E402
from pipeline.search.refine import beats  # noqa: E402  what a confirmation asks of the refined widths
from bench_target import setups  # noqa: E402


def refined_rows(files: list[Path]) -> list[dict]:
    rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
    return [r for r in rows if r.get("refinement") and r["refinement"]["keep"] != r["refinement"]["start"]]


def score_model(name: str, path: Path, options, rows: list[dict]) -> list[dict]:
    """Rows of one model and seed: the shots, teacher and groups as `compress` builds them."""
    ready = workflow.prepare(path, options)
    view, teacher, groups, evalset, x = ready.view, ready.teacher, ready.groups, ready.evalset, ready.shots.calib.x
    aug = ready.layer_augmenter(options.prune)
    reference = convert.run_torch(teacher, evalset.x)[0]
    second = choose.HoldOut(view, teacher, groups, x, options.seed + 1, aug)
    out = []
    for row in rows:
        widths = {side: {int(k): v for k, v in row["refinement"][key].items()}
                  for side, key in (("start", "start"), ("refined", "keep"))}
        unseen = choose.unseen_scores(view, teacher, groups, x, options.prune, widths, options.seed, aug)
        scored = {}
        for side, keep in widths.items():
            student = prune.prune(view, teacher, groups, x, options.prune, augmenter=aug, keep=keep).student
            s = convert.run_torch(student, evalset.x)[0]
            scored[side] = {"second_split": second.score(options.prune, keep), "unseen_folds": unseen[side],
                            "test_relative_squared_error": convert.relative_squared_error(reference, s),
                            "test_top1_agreement": float(np.mean(s.argmax(1) == reference.argmax(1))),
                            "test_accuracy": float(np.mean(s.argmax(1) == evalset.y)) if evalset.y is not None else None}
        better = lambda key: beats(scored["refined"][key], scored["start"][key])
        test_better = scored["refined"]["test_relative_squared_error"] < scored["start"]["test_relative_squared_error"]
        out.append({"model": name, "seed": row["seed"], "batch": row["batch"], **scored,
                    "test_prefers_refined": test_better,
                    "second_split_keeps": better("second_split"), "unseen_folds_keep": better("unseen_folds")})
        r = out[-1]
        print(f"{name:<18} seed {row['seed']} batch {row['batch']:<3} test error {r['start']['test_relative_squared_error']:.4f}"
              f" -> {r['refined']['test_relative_squared_error']:.4f}; second split "
              f"{'keeps' if r['second_split_keeps'] else 'drops'}, unseen folds "
              f"{'keep' if r['unseen_folds_keep'] else 'drop'}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", type=Path, nargs="+", help="outputs of tools/bench_target.py")
    p.add_argument("--eval-count", type=int, default=2000, help="Fashion-MNIST test images for the trained teachers")
    p.add_argument("--out", type=Path, default=Path("results") / "confirm.json",
                   help="JSON written here (default: results/confirm.json under the current directory)")
    args = p.parse_args()
    rows = refined_rows(args.rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        names = sorted({r["model"] for r in rows})
        for name, (path, base) in setups(Path(tmp), names, args.eval_count).items():
            for seed in sorted({r["seed"] for r in rows if r["model"] == name}):
                mine = [r for r in rows if r["model"] == name and r["seed"] == seed]
                results += score_model(name, path, replace(base, seed=seed), mine)
    for rule in ("second_split_keeps", "unseen_folds_keep"):
        right = sum(r[rule] == r["test_prefers_refined"] for r in results)
        print(f"{rule.replace('_', ' ')}: agrees with the test images on {right} of {len(results)} refinements")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
