"""DP-IQA's fixed quality prompts (torch-free).

The released ``gene_text_embedding.py`` writes one sentence for every (quality, scene, distortion)
triple, qualities outermost and distortions innermost, and encodes them with CLIP ViT-L/14. The
word lists below are the released ones, spelling included (``still_life`` keeps its underscore,
``a others`` its article): the released text adapter was trained on exactly these sentences, so
their features must come out the same. The order matters too, since the prompt features are the
U-Net's cross-attention tokens in this order.
"""

from __future__ import annotations

from itertools import product

__all__ = ["QUALITIES", "SCENES", "DISTORTIONS", "PROMPT_TEMPLATE", "quality_prompts"]

QUALITIES = ("bad", "poor", "fair", "good", "perfect")

SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")

# The LIQE-style distortion names, in the released order.
DISTORTIONS = (
    "jpeg2000 compression",
    "jpeg compression",
    "white noise",
    "gaussian blur",
    "fastfading",
    "fnoise",
    "contrast",
    "lens",
    "motion",
    "diffusion",
    "shifting",
    "color quantization",
    "oversaturation",
    "desaturation",
    "white with color",
    "impulse",
    "multiplicative",
    "white noise with denoise",
    "brighten",
    "darken",
    "shifting the mean",
    "jitter",
    "noneccentricity patch",
    "pixelate",
    "quantization",
    "color blocking",
    "sharpness",
    "realistic blur",
    "realistic noise",
    "underexposure",
    "overexposure",
    "realistic contrast change",
    "other realistic",
)

PROMPT_TEMPLATE = "a photo of a {scene} with {distortion} artifacts, which is of {quality} quality"


def quality_prompts() -> list[str]:
    """The 1485 prompts (5 qualities x 9 scenes x 33 distortions) in the released order."""
    return [
        PROMPT_TEMPLATE.format(scene=scene, distortion=distortion, quality=quality)
        for quality, scene, distortion in product(QUALITIES, SCENES, DISTORTIONS)
    ]
