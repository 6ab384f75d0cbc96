"""Parity of diqa against the released DP-IQA and GenzIQA code, stage by stage (README.md).

Runs each side in its own process, one after the other, sharing only files in the work folder:

1. prepare (diqa's Python): synthetic 8-bit images from skimage.data, the GenzIQA noise bank;
2. weights (the released code's Python): seeded random weights of the real sizes, written as
   diffusers / transformers folders and as the released code's own checkpoint files;
3. released dumps (the released code's Python): each stage's tensors, per image;
4. diqa dumps (diqa's Python): the released checkpoint files converted by diqa's converter and
   run by diqa's models on the same weights and images;
5. compare: per stage max abs / max rel differences, float32 and float64, against tolerances
   sized by the float64 run.

    python tools/parity/run.py --released-python /work/parity-venv/bin/python \\
        --released-dpiqa /tmp/DP-IQA --released-genziqa /tmp/GenzIVQA \\
        --method dpiqa --size 512 300x200 640x427 --images 2 --dtype float32 float64

Steps whose output exists are skipped (delete the work folder's file to redo one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from common import METHODS, Work  # noqa: E402


def _run(command: list[str], env: dict, log: Path) -> None:
    print("+", " ".join(command), f"(log: {log})", flush=True)
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    print(f"  {time.time() - started:.0f} s", flush=True)
    if result.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n" + "\n".join(tail))


def sides(work: Work, threads: int, released_python: str, *, dpiqa: Path | None, genziqa: Path | None):
    """(diqa command, its environment, released command, its environment): each side's script
    with its Python, the thread count, and the released process's offline hub, caches and HOME
    (~/diffusers/noise_samples.pkl) inside the work folder."""
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    diqa_env = {**os.environ, **threads_env, "PYTHONPATH": str(REPO), "DIQA_HOME": str(work.root / "diqa-home"),
                "DIQA_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    released_env = {**os.environ, **threads_env, "HOME": str(work.released_home), "HF_HOME": str(work.root / "hf-home"),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCH_HOME": str(work.root / "torch-home"),
                    "PYTHONWARNINGS": "ignore"}
    released = [released_python, str(HERE / "released_side.py"), "--work", str(work.root)]
    for name, clone in (("--dpiqa", dpiqa), ("--genziqa", genziqa)):
        if clone is not None:
            released += [name, str(Path(clone).resolve())]
    return [sys.executable, str(HERE / "diqa_side.py")], diqa_env, released, released_env


def prepare_and_weights(work: Work, methods, sizes, images: int, diqa_side, released_side) -> None:
    """Steps 1 and 2: the images and noise bank, then the random weights of ``methods`` (and the
    shared backbones); each skipped where its output exists. A side is (command, environment)."""
    work.root.mkdir(parents=True, exist_ok=True)
    logs = work.root / "logs"
    logs.mkdir(exist_ok=True)
    wanted = {"sizes": list(sizes), "images": images}
    marker = work.root / "prepared.json"
    if not marker.is_file() or json.loads(marker.read_text()) != wanted:
        _run(diqa_side[0] + ["prepare", "--work", str(work.root), "--size", *sizes, "--images", str(images)],
             diqa_side[1], logs / "prepare.log")
        marker.write_text(json.dumps(wanted))

    parts = {"common": work.clip() / "model.safetensors", "dpiqa": work.heads / "dpiqa_released.pth",
             "dpiqa-student": work.heads / "student_released.pth",
             "genziqa": work.heads / "genziqa" / "unet_states"}
    for part in ["common", *methods]:
        if not parts[part].exists():
            _run(released_side[0] + ["weights", "--part", part, "--diqa-configs", str(REPO / "diqa_cli" / "configs")],
                 released_side[1], logs / f"weights-{part}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--released-python", required=True, help="python of the released code's environment")
    parser.add_argument("--released-dpiqa", required=True, type=Path, help="local clone of RomGai/DP-IQA")
    parser.add_argument("--released-genziqa", required=True, type=Path, help="local clone of sh-r/GenzIVQA")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--size", nargs="+", default=["512", "300x200", "640x427"], help="WIDTHxHEIGHT or N")
    parser.add_argument("--images", type=int, default=2, help="images per size")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    parser.add_argument("--float32-images", type=int, help="run float32 on the first N images only")
    parser.add_argument("--float64-images", type=int, help="run float64 on the first N images only (GenzIQA: 16 U-Net passes an image)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diqa-parity"), help="work folder (weights take ~15 GB)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    args = parser.parse_args()

    work = Work(args.work)
    diqa, diqa_env, released, released_env = sides(work, args.threads, args.released_python,
                                                   dpiqa=args.released_dpiqa, genziqa=args.released_genziqa)
    prepare_and_weights(work, args.method, args.size, args.images, (diqa, diqa_env), (released, released_env))
    logs = work.root / "logs"

    for method in args.method:
        for dtype in args.dtype:
            subset = args.float64_images if dtype == "float64" else args.float32_images
            limit = ["--limit", str(subset)] if subset else []
            for side, command, side_env in (("released", released, released_env), ("diqa", diqa, diqa_env)):
                if work.dump_path(side, method, dtype).is_file():
                    continue
                step = command + ["dump", "--method", method, "--dtype", dtype, *limit]
                if side == "diqa":
                    step += ["--work", str(work.root)]
                _run(step, side_env, logs / f"{side}-{method}-{dtype}.log")
        _run([sys.executable, str(HERE / "compare.py"), "--work", str(work.root), "--method", method],
             diqa_env, logs / f"compare-{method}.log")
        print((work.root / f"result-{method}.md").read_text())


if __name__ == "__main__":
    main()
