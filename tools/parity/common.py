"""What both sides of the parity run share: the work folder's layout, the stage dumps, versions.

Imported by ``released_side.py`` (the released code's environment) and ``diqa_side.py`` (diqa's),
so it needs only the standard library, torch and safetensors.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

METHODS = ("dpiqa", "dpiqa-student", "genziqa")
DTYPES = ("float32", "float64")
SEED = 1234
# The noise bank both GenzIQA sides use: diqa's own, drawn from its default seed.
GENZIQA_SEED = 0
GENZIQA_TIMESTEP_COUNT = 8
SD_LATENT = (4, 64, 64)


class Work:
    """Paths inside the work folder (outside the repository: weights are several GB)."""

    def __init__(self, root: str | Path, limit: int | None = None):
        self.root = Path(root)
        self.limit = limit  # only the first `limit` images (the float64 run of a slow method)
        self.images = self.root / "images"
        self.weights = self.root / "weights"
        self.heads = self.weights / "heads"
        self.dumps = self.root / "dumps"
        # HOME of the released GenzIQA process: its pipeline reads ~/diffusers/noise_samples.pkl.
        self.released_home = self.root / "released-home"
        self.noise_bank = self.root / "noise_bank.safetensors"

    def sd15(self) -> Path:
        return self.weights / "sd15"

    def sd21(self) -> Path:
        return self.weights / "sd21-base"

    def clip(self) -> Path:
        return self.weights / "clip-vit-large-patch14"

    def image_list(self) -> list[dict]:
        return json.loads((self.images / "images.json").read_text())[: self.limit]

    def dump_path(self, side: str, method: str, dtype: str) -> Path:
        return self.dumps / f"{side}-{method}-{dtype}.safetensors"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


class StageDump:
    """Stage tensors keyed ``<image id>/<stage>``, written as one safetensors file per side,
    method and dtype, with the environment in its metadata."""

    def __init__(self):
        self.tensors: dict = {}

    def put(self, image: str, stage: str, value) -> None:
        key = f"{image}/{stage}"
        if key in self.tensors:
            raise RuntimeError(f"stage {key} captured twice")
        self.tensors[key] = value.detach().to("cpu").contiguous().clone()

    def save(self, path: Path, environment: dict) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(path), metadata={"environment": json.dumps(environment, sort_keys=True)})


class Hooks:
    """Forward hooks that put module outputs (or inputs) into a StageDump under the current image."""

    def __init__(self, dump: StageDump):
        self.dump = dump
        self.image = None
        self.handles = []

    def output(self, module, stage, pick=lambda out: out[0]):
        """``pick`` takes the module output to the tensor to keep (default: the batch's first
        item); a list or tuple it returns is kept as ``stage.0``, ``stage.1``, ..."""

        def hook(m, args, out):
            value = pick(out)
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    self.dump.put(self.image, f"{stage}.{index}", item)
            else:
                self.dump.put(self.image, stage, value)

        self.handles.append(module.register_forward_hook(hook))

    def close(self):
        for handle in self.handles:
            handle.remove()


def load_dump(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        environment = json.loads((handle.metadata() or {}).get("environment", "{}"))
    return load_file(str(path)), environment


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def environment(packages: tuple[str, ...], **extra) -> dict:
    """Python, platform and the versions of ``packages`` as this process imported them."""
    import importlib

    import torch

    versions = {}
    for name in packages:
        module = sys.modules.get(name) or importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "?")
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {torch.get_num_threads()}",
        "packages": versions,
        **extra,
    }
