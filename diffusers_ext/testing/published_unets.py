"""Published UNet configs of SD1.5, SDXL and Kolors (the values of their unet/config.json that set widths and
depth), for real-width checks and benchmarks that build the UNet with random weights and download nothing."""

# from the published unet/config.json of runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0 and Kwai-Kolors/Kolors-diffusers
SD15 = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
KOLORS = {
    **SDXL,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "projection_class_embeddings_input_dim": 5632,
}
# phrase feature widths: CLIP-L pooled (SD1.5), both pooled CLIP outputs (SDXL), ChatGLM3 hidden (Kolors)
