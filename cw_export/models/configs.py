"""Architectures as data: the built-in tiny pipeline and published Stable Diffusion configs.

Kept apart from the code that builds models so that a config can be read, diffed and stored in a manifest.
The SD v1.5 entries are the published `runwayml/stable-diffusion-v1-5` component configs (weights are not
downloadable here, so they are only ever instantiated with seeded random weights).
"""

from __future__ import annotations

# Default sampler for every bundle: DPM-Solver++ 2M, the paper's deployment sampler (PAPER.md, "Training").
SD_NOISE_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "steps_offset": 1,
}

# Tiny pipeline: 3 resolution levels with cross-attention so the Stage-1 cut is meaningful
# (high_res_in = level 0, low_res = levels 1..2 + mid, high_res_out = last up level).
TINY_UNET: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}

TINY_TEXT_ENCODER: dict = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

TINY_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# --- Published component configs for the architecture-only models `sd15-arch` / `sd21-arch` -------------------------
# Weights are seeded random (nothing can be downloaded); what these reproduce is the architecture, the parameter count
# and the FLOPs, so the whole toolchain (export, external data, runtime, FLOPs, benchmarks) runs at real size.
# The text encoder's vocab_size is replaced by the project's BPE tokenizer length at build time (token ids differ from
# real CLIP's 49408-entry vocabulary; only the token-embedding table shrinks, the transformer is unchanged).

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14 text tower).
SD15_TEXT_ENCODER: dict = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
CLIP_VOCAB_SIZE = 49408  # the published vocab size, for reference; the built model uses the project tokenizer's

# runwayml/stable-diffusion-v1-5 vae/config.json (SD 2.1 ships the same VAE architecture and scaling factor).
SD15_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-2-1 unet/config.json: per-level head dims, 1024-d OpenCLIP context, linear projections,
# attention upcast; native 768x768 (latent 96).
SD21_UNET: dict = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, penultimate layer: 23 layers).
SD21_TEXT_ENCODER: dict = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "layer_norm_eps": 1e-5,
}

# SD 2.1 (768) is a v-prediction model; same scaled-linear betas as SD 1.5.
SD21_NOISE_SCHEDULE: dict = {**SD_NOISE_SCHEDULE, "prediction_type": "v_prediction"}

# --- SDXL: two text encoders, added (text_time) conditioning, a 3-level UNet ----------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 3 resolution levels (128, 64, 32 at 1024x1024),
# transformer depth 1 / 2 / 10, a 2048-d context (768 + 1280: both encoders' penultimate layers concatenated), and
# ``text_time`` added conditioning: time embedding += MLP(pooled text [1280] ++ sinusoid of 6 size/crop ids [6 x 256]).
SDXL_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# sdxl-base text_encoder/config.json (CLIP ViT-L/14 text tower, as SD 1.5's; its penultimate layer is used).
SDXL_TEXT_ENCODER: dict = {**SD15_TEXT_ENCODER}

# sdxl-base text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower, CLIPTextModelWithProjection: its projected
# pooled output is the UNet's ``text_embeds`` and the adaptor's pooled text).
SDXL_TEXT_ENCODER_2: dict = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}

# sdxl-base vae/config.json: SD's VAE architecture with SDXL's scaling factor.
SDXL_VAE: dict = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}

# sdxl-base scheduler/scheduler_config.json (EulerDiscreteScheduler): SD's betas, "leading" timestep spacing.
SDXL_NOISE_SCHEDULE: dict = {**SD_NOISE_SCHEDULE, "timestep_spacing": "leading"}

# A tiny SDXL-structured model (``tiny-sdxl``, seeded random weights) for fast tests: the same block types, two text
# encoders and text_time conditioning as SDXL at toy widths.
TINY_SDXL_UNET: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "norm_num_groups": 8,
    "cross_attention_dim": 64,  # 32 (text_encoder) + 32 (text_encoder_2)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 32 (text_encoder_2 projection) + 6 x 8
}
TINY_SDXL_TEXT_ENCODER_2: dict = {**TINY_TEXT_ENCODER, "hidden_act": "gelu"}
TINY_SDXL: dict = {"unet": TINY_SDXL_UNET, "text_encoder": TINY_TEXT_ENCODER, "text_encoder_2": TINY_SDXL_TEXT_ENCODER_2,
                   "vae": {**TINY_VAE, "scaling_factor": 0.13025}, "noise_schedule": SDXL_NOISE_SCHEDULE,
                   "force_zeros_for_empty_prompt": True}

# name -> components; read by models.pipeline (builders) and cw_export.bundle.flops (meta-device FLOP counts).
ARCHITECTURES: dict = {
    "sd15-arch": {"unet": SD15_UNET, "text_encoder": SD15_TEXT_ENCODER, "vae": SD15_VAE,
                  "noise_schedule": SD_NOISE_SCHEDULE},
    "sd21-arch": {"unet": SD21_UNET, "text_encoder": SD21_TEXT_ENCODER, "vae": SD15_VAE,
                  "noise_schedule": SD21_NOISE_SCHEDULE},
    "sdxl-arch": {"unet": SDXL_UNET, "text_encoder": SDXL_TEXT_ENCODER, "text_encoder_2": SDXL_TEXT_ENCODER_2,
                  "vae": SDXL_VAE, "noise_schedule": SDXL_NOISE_SCHEDULE, "force_zeros_for_empty_prompt": True},
}
