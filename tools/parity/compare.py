"""Compare the stage dumps of both sides: per method, image and stage, the max abs and max rel
differences in float32 and float64 and a pass/fail against a tolerance sized by the float64 run.

Tolerance of a stage (see README.md): with r32, r64 the released stage in float32 and float64 and
d32, d64 diqa's, the max-abs norm gives |d32 - r32| <= |d32 - d64| + |d64 - r64| + |r64 - r32|.
float32's own rounding error on a stage is own = |d32 - d64| + |r32 - r64|; the tolerance is
``FACTOR * own``, as a fraction of the stage's magnitude (max |r64|), the largest over the images
run in both dtypes, applied to every image at its own magnitude. A stage passes in float32 when
|d32 - r32| <= tolerance; in float64 when |d64 - r64| <= tolerance (the two implementations agree
at least as well there as float32 rounding alone allows; the ratio to the float32 difference says
how much of it is arithmetic).

    compare.py --work W --method dpiqa [--out result.json] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Work, load_dump  # noqa: E402

FACTOR = 2.0
# Floor on the relative tolerance: a stage both sides compute exactly (own error 0) still gets
# a float32 rounding's worth.
FLOOR = 2.0**-23


_ORDER = ("input", "prompt_features", "prompt_embeddings", "context", "latents", "adapter", "features", "up",
          "conv_transpose", "t", "feature_map", "score")
_PER_TIMESTEP = ("unet_input", "noise_pred", "layer_scores")


def _stage_key(stage: str):
    """Order stages as the pipelines run them (``tK.*`` by timestep, then input, output, scores)."""
    timestep = re.fullmatch(r"t(\d+)\.(\w+)", stage)
    if timestep:
        return _ORDER.index("t"), [int(timestep.group(1)), _PER_TIMESTEP.index(timestep.group(2))], stage
    head = re.split(r"[.\d]", stage, maxsplit=1)[0]
    rank = _ORDER.index(head) if head in _ORDER else len(_ORDER)
    return rank, [int(n) for n in re.findall(r"\d+", stage)], stage


def _diff(a, b) -> tuple[float, float]:
    """max |a - b| and max |a - b| / max |b| (relative to the stage's magnitude, so near-zero
    elements do not blow it up)."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    abs_diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return abs_diff, abs_diff / scale if scale else float("inf") if abs_diff else 0.0


def compare(work: Work, method: str) -> dict:
    dumps, envs = {}, {}
    for side in ("released", "diqa"):
        for dtype in ("float32", "float64"):
            path = work.dump_path(side, method, dtype)
            if path.is_file():
                dumps[side, dtype], envs[f"{side}-{dtype}"] = load_dump(path)
    if ("released", "float32") not in dumps or ("diqa", "float32") not in dumps:
        raise SystemExit(f"{method}: float32 dumps of both sides are needed")
    r32, d32 = dumps["released", "float32"], dumps["diqa", "float32"]
    r64, d64 = dumps.get(("released", "float64"), {}), dumps.get(("diqa", "float64"), {})
    # Images one side ran and the other did not (a --limit) are left out; a stage that one side
    # dumps for an image and the other does not is an error.
    images = {k.split("/")[0] for k in r32} & {k.split("/")[0] for k in d32}
    r32 = {k: v for k, v in r32.items() if k.split("/")[0] in images}
    d32 = {k: v for k, v in d32.items() if k.split("/")[0] in images}
    missing = sorted(set(r32) ^ set(d32))
    if missing:
        raise SystemExit(f"{method}: stages only one side dumped: {missing[:8]}")

    # Relative tolerance per stage from the images run in both dtypes on both sides.
    tolerance: dict[str, float] = {}
    for key in r32:
        if key in r64 and key in d64:
            stage = key.split("/", 1)[1]
            own = _diff(d32[key], d64[key])[0] + _diff(r32[key], r64[key])[0]
            scale = r64[key].double().abs().max().item() or 1.0
            tolerance[stage] = max(tolerance.get(stage, 0.0), FACTOR * own / scale, FLOOR)

    rows = []
    for key in sorted(r32, key=lambda k: (k.split("/")[0], _stage_key(k.split("/", 1)[1]))):
        image, stage = key.split("/", 1)
        if stage == "timesteps":
            continue
        abs32, rel32 = _diff(d32[key], r32[key])
        scale = r32[key].double().abs().max().item()
        tol_rel = tolerance.get(stage)
        row = {"image": image, "stage": stage, "shape": list(r32[key].shape), "magnitude": scale,
               "abs32": abs32, "rel32": rel32, "tol_rel": tol_rel}
        if tol_rel is not None:
            row["pass32"] = rel32 <= tol_rel
        if key in r64 and key in d64:
            row["abs64"], row["rel64"] = _diff(d64[key], r64[key])
            row["pass64"] = row["rel64"] <= tol_rel
        rows.append(row)
    timesteps = {side: d[k].tolist() for side, d in (("released", r32), ("diqa", d32)) for k in d if k.endswith("/timesteps")}
    return {"method": method, "factor": FACTOR, "tolerance_rel": tolerance, "rows": rows,
            "environments": envs, "timesteps": timesteps}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "pass" if value else "**FAIL**"
    return f"{value:.2e}"


def markdown(result: dict) -> str:
    lines = [
        "| image | stage | shape | max abs f32 | max rel f32 | max abs f64 | max rel f64 | tolerance (rel) | f32 | f64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        shape = "×".join(str(s) for s in row["shape"])
        lines.append(
            f"| {row['image']} | {row['stage']} | {shape} | {_fmt(row['abs32'])} | {_fmt(row['rel32'])} | "
            f"{_fmt(row.get('abs64'))} | {_fmt(row.get('rel64'))} | {_fmt(row['tol_rel'])} | "
            f"{_fmt(row.get('pass32'))} | {_fmt(row.get('pass64'))} |"
        )
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """One row per stage: the largest differences over the images, and how many passed."""
    stages: dict[str, list[dict]] = {}
    for row in result["rows"]:
        stages.setdefault(row["stage"], []).append(row)
    lines = [
        "| stage | images (f32 / f64) | max rel f32 | max abs f32 | max rel f64 | max abs f64 | tolerance (rel) | f32 pass | f64 pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, rows in stages.items():
        in64 = [r for r in rows if "rel64" in r]
        best = lambda key, rs: max((r[key] for r in rs), default=None)  # noqa: E731
        passed32 = f"{sum(bool(r.get('pass32')) for r in rows)}/{len(rows)}" if rows[0]["tol_rel"] else "–"
        passed64 = f"{sum(bool(r.get('pass64')) for r in in64)}/{len(in64)}" if in64 else "–"
        lines.append(
            f"| {stage} | {len(rows)} / {len(in64)} | {_fmt(best('rel32', rows))} | {_fmt(best('abs32', rows))} | "
            f"{_fmt(best('rel64', in64))} | {_fmt(best('abs64', in64))} | {_fmt(rows[0]['tol_rel'])} | "
            f"{passed32} | {passed64} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--out", help="JSON result (default W/result-METHOD.json)")
    parser.add_argument("--markdown", help="markdown table (default W/result-METHOD.md)")
    args = parser.parse_args()
    work = Work(args.work)
    result = compare(work, args.method)
    out = Path(args.out or work.root / f"result-{args.method}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = summary(result) + "\n" + markdown(result)
    Path(args.markdown or work.root / f"result-{args.method}.md").write_text(table)
    failed = [r for r in result["rows"] if r.get("pass32") is False or r.get("pass64") is False]
    print(table)
    print(f"{args.method}: {len(result['rows'])} stage comparisons, {len(failed)} beyond tolerance")


if __name__ == "__main__":
    main()
