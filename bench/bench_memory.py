"""Peak memory of scoring with a DP-IQA teacher that carries its own fine-tuned U-Net (the
released layout), before and after diqa stopped keeping the backbone's U-Net as well.

* before: the model copies the backbone's U-Net, the checkpoint is loaded into the copy, and the
  backbone keeps its own (two U-Nets held, three at the peak of loading);
* after:  ``scoring.load_scorer``: the U-Net is built from the checkpoint's tensors (no copy first)
  and the backbone's is freed (one U-Net held).

Random weights at SD 1.5's U-Net size (``--unet sd15``, 860 M parameters) or a quarter of it
(``--unet half``: half the channels); the VAE and CLIP are the tiny ones (their size is the same in
both settings). Each setting runs in a fresh process; peak resident memory (ru_maxrss) is printed
side by side with the ratio. CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, unet_size: str) -> Path:
    """A backbone folder with an SD-sized random U-Net (tiny VAE, text encoder and CLIP whose
    projection matches the U-Net) and a fine-tuned DP-IQA head saved on it. Returns the head."""
    import torch
    from diffusers import UNet2DConditionModel

    from diqa_cli.backbone import load_backbone
    from diqa_cli.checkpoint import save_head
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.tiny import TINY_CONFIG_DIR, write_tiny_backbone

    write_tiny_backbone(root)
    config = UNet2DConditionModel.load_config(Path(TINY_CONFIG_DIR).parent / "sd15", subfolder="unet")
    if unet_size == "half":
        config = {**config, "block_out_channels": [c // 2 for c in config["block_out_channels"]]}
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(root / "backbone" / "unet")
    # DP-IQA's prompt features come from CLIP: its projection must match the U-Net's context width.
    clip_config = json.loads((root / "clip" / "config.json").read_text())
    if clip_config["projection_dim"] != config["cross_attention_dim"]:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        clip_config["projection_dim"] = config["cross_attention_dim"]
        clip = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(clip_config))
        clip.save_pretrained(root / "clip")
    backbone = load_backbone(str(root / "backbone"), device="cpu", dtype="fp32", offline=True)
    model = DPIQA(backbone, clip="./clip", decoder_channels=64, score_channels=[16, 8], fc_hidden=64)
    return save_head(model, root / "heads" / "dpiqa.safetensors", normalisation={"offset": 0.0, "scale": 1.0})


def measure(head: str, setting: str) -> dict:
    """Run in a fresh process: load the head one way, score one image, report peak RSS."""
    import torch

    from diqa_cli.checkpoint import read_sidecar
    from diqa_cli.files import read_safetensors

    started = time.perf_counter()
    if setting == "before":
        from diqa_cli.backbone import load_backbone
        from diqa_cli.models.dpiqa import DPIQA

        sidecar = read_sidecar(head)
        backbone = load_backbone(sidecar["backbone"]["ref"], device="cpu", dtype="fp32", offline=True)
        model = DPIQA(backbone, **sidecar["config"])  # copies the backbone's U-Net, then loads into it
        model.load_checkpoint_state_dict(read_safetensors(head))
    else:
        from diqa_cli.scoring import load_scorer

        model, _ = load_scorer(None, checkpoint=head, device="cpu", dtype="fp32", offline=True)
    loaded = time.perf_counter() - started
    with torch.no_grad():
        score = float(model.eval()(torch.rand(1, 3, model.resolution, model.resolution, generator=torch.Generator().manual_seed(0)))[0])
    unets = 1 + (not next(model.backbone.unet.parameters()).is_meta)
    return {"setting": setting, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "unets_held": unets, "load_s": loaded, "score": score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=("sd15", "half"), default="half")
    parser.add_argument("--measure", nargs=2, metavar=("HEAD", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory(prefix="diqa-bench-memory-") as tmp:
        os.environ.setdefault("DIQA_HOME", str(Path(tmp) / "home"))
        head = build(Path(tmp), args.unet)
        results = {}
        for setting in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(head), setting],
                                 check=True, capture_output=True, text=True, env=os.environ).stdout
            results[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"memory bench: DP-IQA teacher with its own U-Net ({args.unet} U-Net, random weights), CPU fp32, one 512 px image")
    print(f"{'setting':<8} {'peak GiB':>9} {'U-Nets held':>12} {'load s':>7} {'score':>10}")
    for r in results.values():
        print(f"{r['setting']:<8} {r['peak_gib']:>9.2f} {r['unets_held']:>12} {r['load_s']:>7.1f} {r['score']:>10.5f}")
    print(f"ratio peak memory after/before: {results['after']['peak_gib'] / results['before']['peak_gib']:.2f}")
    before, after = results["before"]["score"], results["after"]["score"]
    print(f"score difference after-before: {after - before:.3g} (relative {abs(after - before) / max(abs(before), 1e-12):.2g})")


if __name__ == "__main__":
    main()
