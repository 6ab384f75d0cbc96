"""DP-IQA student: an EfficientNet-B7 distilled from the DP-IQA teacher's feature map and score."""

from diqa_cli.methods import MethodSpec, ScoreNormalisation, TrainingDefaults, WeightsPart, register_method

_PAPER = (
    "Fu et al., DP-IQA: Utilizing Diffusion Prior for Blind Image Quality Assessment in the Wild, "
    "arXiv 2405.19996"
)

SPEC = register_method(
    MethodSpec(
        name="dpiqa-student",
        summary="DP-IQA student: EfficientNet-B7 distilled from the DP-IQA teacher (no diffusion at run time)",
        paper=_PAPER,
        model="diqa_cli.models.dpiqa_student:DPIQAStudent",
        # The teacher's backbone, which distillation runs on; scoring with the student never
        # loads it (its spec says needs_backbone=False).
        default_backbone="sd15",
        resolution=512,
        resample="bilinear",  # torchvision Resize default in the released transform
        input_convention="[0,1] RGB, no ImageNet normalisation (released convention), 512x512 resize without crop",
        timesteps=(),
        score_range=(
            "unbounded regression output; the released code trains on MOS/100 (KonIQ: its CSV's MOS "
            "column / 100), diqa heads on MOS mapped to [0,1]; the sidecar's offset/scale gives the reported score"
        ),
        checkpoint_layout=(
            "released parameter names: base_model.* (torchvision EfficientNet, BatchNorm statistics "
            "included), conv_transpose.*, fc1..fc3.*"
        ),
        licence="CC BY-NC-SA 4.0 (released weights, non-commercial); diqa code Apache-2.0",
        released_weights=("dpiqa-student-koniq",),
        deviations=(
            "ImageNet initialisation for training from scratch is opt-in, from the weights manifest's "
            "'efficientnet-b7-imagenet' entry (released: torchvision pretrained=True download)",
            "the feature-map size and fc1 width follow the input resolution (released hard-codes 512 px)",
        ),
        # Released heads regress the training label divided by 100; scale 100 reports that label.
        released_normalisation=ScoreNormalisation(0.0, 100.0),
        needs_backbone=False,
        weights=(WeightsPart("dpiqa-student-koniq", purpose="released head (KonIQ-10k)", role="head"),),
        teacher="dpiqa",
        quality_map=(
            "per-location contribution of the 8-channel feature map to the score through the FC head "
            "(gradient x activation, summed over channels), R/8 grid, as the teacher's"
        ),
        training=TrainingDefaults(1e-4, 0.0, 24, 30, None, "DP-IQA train_student.py: Adam 1e-4, batch 24, 30 epochs"),
        extra={
            "feature_map": "(8, R/8, R/8), matched to the teacher's map in distillation",
        },
    )
)
