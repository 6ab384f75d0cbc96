"""GenzVQA: GenzIQA's prompt-guided cross-attention scores over video frames, modulated per layer
by SlowFast motion features."""

from diqa_cli.methods import BACKBONE_CORE, MethodSpec, TrainingDefaults, WeightsPart, register_method

GENZVQA_TIMESTEPS = (9, 34, 59, 84)

SPEC = register_method(
    MethodSpec(
        name="genzvqa",
        summary=(
            "GenzVQA: GenzIQA cross-attention layer scores of sampled frames at 4 timesteps, each layer "
            "scaled by a temporal quality modulator reading SlowFast R50 slow and fast features"
        ),
        paper=(
            "Mitra, De, Rao, Soundararajan, Image and Video Quality Assessment using Prompt-Guided "
            "Latent Diffusion Models for Cross-Dataset Generalization, arXiv 2406.04654 (TMLR)"
        ),
        model="diqa_cli.models.genzvqa:GenzVQA",
        default_backbone="sd21-base",
        input_kind="video",
        resolution=512,
        resample="bicubic",
        input_convention="CLIP mean/std",
        timesteps=GENZVQA_TIMESTEPS,
        score_range="MOS scale of the training set (released: raw MOS)",
        checkpoint_layout=(
            "GenzIQA's ('ctx', cross-attention LoRA as diffusers 0.17 save_attn_procs names it) plus the "
            "released modulator files' names under their file stems: 'slowAttn.<block>.{norm,k_down,k_up}.*', "
            "'fastAttn.<block>.{norm,k_down,k_up}.*', 'linearBlocks.<block>.{weight,bias}' (block as "
            "'down_block_0_attn_1', 'mid_block_attn_0', 'up_block_3_attn_2'); the sidecar's config names "
            "the SlowFast weights ('slowfast', 'slowfast_sha256')"
        ),
        licence="MIT (released code); no released weights",
        released_weights=(),
        deviations=(
            "VAE posterior mean instead of a sample (released: latent_dist.sample())",
            "noise bank drawn from the recorded seed, one tensor per timestep shaped to the latent "
            "(released: unseeded randn(1000,4,64,64) pickled under ~/diffusers)",
            "no random horizontal/vertical flips at test time (released test loaders flip)",
            "frames picked by presentation timestamp (released: np.linspace over decoded frame indices, "
            "the same for constant frame rate)",
            "SlowFast features computed in the same run from one 32-frame clip per second of video "
            "(released: precomputed .npy files whose extraction code was not published)",
            "layer scores are kept per frame in a batch (released averages a layer over the whole U-Net "
            "batch; identical at its test batch size of 1)",
            "no LoRA on self-attention (released attaches attn1 LoRA but freezes it at zero, so outputs "
            "are the same)",
            "LoRA through peft instead of diffusers 0.17's LoRACrossAttnProcessor (same init: down "
            "N(0,1/r), up 0, scale 1)",
        ),
        draws_noise=True,
        weights=(
            WeightsPart(
                "sd21-base", (*BACKBONE_CORE, "text_encoder", "tokenizer"),
                purpose="backbone, with its text encoder for the learned prompts", role="backbone",
            ),
            WeightsPart("slowfast-r50-k400", purpose="SlowFast R50 features for the temporal modulator"),
        ),
        quality_map=(
            "per scored frame, GenzIQA's map (the detail map integrated from the blurred frame, 8 steps) "
            "of the frame's own score: mean over layers of gamma x layer score, gamma held at the video's"
        ),
        training=TrainingDefaults(1e-4, 1e-2, 16, 6, 1.0, "GenzVQA: AdamW 1e-4, wd 1e-2, grad-clip 1.0, batch 16, 6 epochs"),
        init_from=("genziqa",),  # the released recipe: prompts and LoRA from a GenzIQA head
        default_for=("score-video",),
        frames_per_video=8,
        training_frames_per_video=12,
        extra={
            "interpolation": "bicubic, aspect ratio ignored",
            "prompts": ["Good Photo.", "Bad Photo."],
            "frames_note": "8 frames spread over the video unless --fps-sub/--max-frames say otherwise "
            "(released: 8 frames for KoNViD test, 12 for LSVQ training)",
            "slowfast": "slowfast-r50-k400",
            "slowfast_clip": "32 frames at the native rate, short side 224 + centre crop, Kinetics mean/std; "
            "slow pathway every 4th frame; one clip per second of video, at most 16",
            "modulator": "per cross-attention layer: slow and fast keys LayerNorm -> Linear(D->64) -> "
            "Linear(64->C_l); frame query means attend to them (logits x 8, mean over heads, frames, prompts "
            "and clips) -> Linear(2->1) + ReLU = gamma_l; video score = mean_l gamma_l x frame-mean layer score",
            "query_features": "spatial-mean cross-attention queries at the last scoring timestep (84), as the "
            "released pipeline returns those of its last timestep",
            "unet_evaluations_per_frame": 2 * len(GENZVQA_TIMESTEPS),
            "training": "one random t in [0, 100) and one noise per video, shared by its frames; MSE against "
            "MOS; modulator trained with the prompt context and LoRA (released: LSVQ, 6 epochs, AdamW 1e-4)",
        },
    )
)
