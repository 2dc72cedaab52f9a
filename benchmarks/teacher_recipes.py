"""Which teacher recipe labels best? The teacher alone, on the labeled images of one split.

For each named recipe (a set of `teacher.*` Hydra overrides, RECIPES) and seed: the shared part
of `ssl_gain.py` (ingest, train_teacher, pseudo_label, merge, through the pipeline's own stage
functions, each recipe in its own work folder) and the teacher's test accuracy and the precision
of its pseudo-labels on every unlabeled image. A better labeler is what the student needs; a
better teacher is also a stronger labeled-only model (the baseline starts from it), so a recipe
chosen here must then be judged by `ssl_gain.py` against that stronger bar.

    python benchmarks/teacher_recipes.py --budget 50 --seeds 0
    python benchmarks/teacher_recipes.py --recipes noisy weak --seeds 0 1

Extra arguments after `--` are Hydra overrides applied to every recipe. Rows are merged into
benchmarks/results/teacher_recipes.json (a row with the same budget, seed, recipe and overrides
is replaced).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ssl_gain  # noqa: E402

WEAK = [  # flip and 10 % shifts only: the baseline's kind of view
    "teacher.train.augment.rotate=0",
    "teacher.train.augment.zoom=0",
    "teacher.train.augment.contrast=0",
]
NOISY = [  # the teacher's views until 0a1b564: the student's kind of noise
    "teacher.train.augment.rotate=0.05",
    "teacher.train.augment.zoom=0.1",
    "teacher.train.augment.contrast=0.2",
]
RECIPES = {
    "noisy": NOISY,
    "weak": WEAK,  # the default since 0a1b564
    "noisy_deep": [*NOISY, "teacher.model.depth=4"],  # the student's network
    "weak_deep": [*WEAK, "teacher.model.depth=4"],
}


def main(argv: list[str] | None = None) -> int:
    argv, overrides = ssl_gain.split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--work", type=Path, default=Path("/tmp/teacher_recipes_work"))
    parser.add_argument("--out", type=Path, default=ssl_gain.RESULTS / "teacher_recipes.json")
    args = parser.parse_args(argv)
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    for seed in args.seeds:
        for recipe in args.recipes:
            chosen = [*overrides, *RECIPES[recipe]]
            start = time.perf_counter()
            _, info = ssl_gain.shared_part(args.budget, seed, chosen, args.work / recipe)
            row = {"budget": args.budget, "seed": seed, "recipe": recipe, "overrides": chosen}
            row["code"] = ssl_gain.code_version()
            row["teacher"] = info["teacher"]
            row["pseudo_label_precision"] = round(info["pseudo_label_precision"], 4)
            row["seconds"] = info["seconds"]
            keys = ("budget", "seed", "recipe", "overrides")
            same = [r for r in payload["rows"] if all(r[k] == row[k] for k in keys)]
            payload["rows"] = [r for r in payload["rows"] if r not in same] + [row]
            payload.setdefault("commands", [])
            if " ".join(sys.argv) not in payload["commands"]:
                payload["commands"].append(" ".join(sys.argv))
            ssl_gain.model_io.write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
            print(json.dumps(row), f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
