"""GenzIQA: prompt-guided cross-attention of Stable Diffusion 2.1-base as a quality measure."""

from diqa_cli.methods import BACKBONE_CORE, MethodSpec, TrainingDefaults, WeightsPart, register_method

GENZIQA_TIMESTEPS = (9, 21, 33, 45, 57, 69, 81, 93)

SPEC = register_method(
    MethodSpec(
        name="genziqa",
        summary=(
            "GenzIQA: log-sum-exp pooled cross-attention logits of SD 2.1-base with learnable "
            "'Good Photo.' / 'Bad Photo.' prompts and cross-attention LoRA, 8 timesteps x 2 prompts"
        ),
        paper=(
            "Mitra, De, Rao, Soundararajan, Image and Video Quality Assessment using Prompt-Guided "
            "Latent Diffusion Models for Cross-Dataset Generalization, arXiv 2406.04654 (TMLR)"
        ),
        model="diqa_cli.models.genziqa:GenzIQA",
        default_backbone="sd21-base",
        resolution=512,
        resample="bicubic",
        input_convention="CLIP mean/std",
        timesteps=GENZIQA_TIMESTEPS,
        score_range="MOS scale of the training set (released: raw MOS)",
        checkpoint_layout=(
            "released names: 'ctx' (16 x text width context vectors, as in coop_Model_state_dict) and "
            "'<attn2 module>.processor.to_{q,k,v,out}_lora.{down,up}.weight' (rank-4 cross-attention LoRA, "
            "as diffusers 0.17 save_attn_procs writes it; down = peft lora_A, up = lora_B); nothing else"
        ),
        licence="MIT (released code); no released weights",
        released_weights=(),
        deviations=(
            "VAE posterior mean instead of a sample (released: latent_dist.sample())",
            "noise bank drawn from the recorded seed, one tensor per timestep shaped to the latent "
            "(released: unseeded randn(1000,4,64,64) pickled under ~/diffusers)",
            "no random horizontal/vertical flips at test time (released test loaders flip)",
            "layer scores are kept per image in a batch (released averages a layer over the whole U-Net "
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
        ),
        quality_map=(
            "the detail map (gradient x (image - its blur), smoothed) integrated along the path from "
            "the blurred image in 8 steps: mean = score(x) - score(blurred x); 8 backward passes"
        ),
        training=TrainingDefaults(1e-4, 1e-2, 16, 10, 1.0, "GenzIQA: AdamW 1e-4, wd 1e-2, grad-clip 1.0, batch 16, 10 epochs"),
        extra={
            "prompts": ["Good Photo.", "Bad Photo."],
            "context_tokens": 16,
            "lora_rank": 4,
            "lse_temperature": 0.14,
            "unet_evaluations_per_image": 2 * len(GENZIQA_TIMESTEPS),
            "layer_score": "mean over heads, 77 tokens and both prompts of the pooled logits, plus "
            "||eps - eps_hat(good)|| - ||eps - eps_hat(bad)||",
            "training": "random t in [0, 100) per image, fresh noise, MSE against MOS (released: raw MOS, "
            "AdamW lr 1e-4, wd 1e-2, batch 16, 10 epochs on FLIVE)",
        },
    )
)
