"""Tiny, offline text-to-image pipelines of each architecture the spatial adapter supports.

``StableDiffusionPipeline`` (one CLIP text encoder), ``StableDiffusionXLPipeline`` (two CLIP encoders,
``text_time`` added conditions) and ``KolorsPipeline`` (a ChatGLM text encoder and an ``encoder_hid_proj``
into the UNet) are built here from configs with random weights, with tokenizers made from files written
on the spot: a byte-level CLIP vocabulary without merges, and a SentencePiece model trained in well under
a second on toy-world captions (English and Chinese) for ChatGLM. Nothing is downloaded, so tests run on
machines without network access; the shapes are what matter, not the quality of the images.

The sizes live in ``TINY_PIPELINE_CONFIG``: 64-pixel images, 8x8 latents (a VAE with four levels, scale
factor 8, as in SD), text encoders of width 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    KolorsPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_ext.testing.tiny_unet import TINY_UNET_CONFIG

__all__ = [
    "TINY_PIPELINE_CONFIG",
    "tiny_clip_tokenizer",
    "save_tiny_pipeline",
    "tiny_kolors_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

TINY_PIPELINE_CONFIG = {
    "image_size": 64,
    "text_width": 32,
    "max_text_length": 128,
    # the UNet of diffusers_ext.testing.tiny_unet (SD-shaped: 4 latent channels), cross-attention width set per pipeline
    "unet": {k: v for k, v in TINY_UNET_CONFIG.items() if k != "cross_attention_dim"},
    "addition_time_embed_dim": 8,
    "vae": {
        "block_out_channels": (8, 16, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    },
    "clip_text": {
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 514,
    },
    "chatglm": {
        "num_layers": 2,
        "ffn_hidden_size": 64,
        "kv_channels": 8,
        "num_attention_heads": 4,
        "seq_length": 256,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "original_rope": True,
    },
    "chatglm_vocab_size": 400,
    # SD1.5's noise schedule; DDIM for SD, Euler for SDXL and Kolors, as their releases ship.
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "corpus_scenes": 200,
}


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer(max_length: int | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (with and without the end-of-word mark) and no merges: every
    string tokenizes, offline, into 514 ids at most."""
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    length = TINY_PIPELINE_CONFIG["max_text_length"] if max_length is None else max_length
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=length)


def _clip_text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    cfg = TINY_PIPELINE_CONFIG
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        hidden_size=cfg["text_width"],
        max_position_embeddings=cfg["max_text_length"],
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **cfg["clip_text"],
        **extra,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(sample_size=TINY_PIPELINE_CONFIG["image_size"], **TINY_PIPELINE_CONFIG["vae"])


def _sdxl_style_unet(cross_attention_dim: int, pooled_dim: int, **extra) -> UNet2DConditionModel:
    """A UNet with SDXL's added conditions: pooled text + 6 size/crop numbers, each Fourier-embedded."""
    time_dim = TINY_PIPELINE_CONFIG["addition_time_embed_dim"]
    return UNet2DConditionModel(
        **TINY_PIPELINE_CONFIG["unet"],
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        **extra,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5-shaped: CLIP text encoder (width 32) -> UNet cross-attention dim 32; DDIM scheduler."""
    torch.manual_seed(seed)
    width = TINY_PIPELINE_CONFIG["text_width"]
    unet = UNet2DConditionModel(**TINY_PIPELINE_CONFIG["unet"], cross_attention_dim=width)
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()).eval(),
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            **TINY_PIPELINE_CONFIG["scheduler"], clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-shaped: two CLIP encoders whose hidden states are concatenated (32 + 32 = 64 cross-attention
    dim) and the second one's projected pooled output (32) among the added conditions."""
    torch.manual_seed(seed)
    width = TINY_PIPELINE_CONFIG["text_width"]
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=width)).eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=_sdxl_style_unet(cross_attention_dim=2 * width, pooled_dim=width),
        scheduler=EulerDiscreteScheduler(**TINY_PIPELINE_CONFIG["scheduler"]),
    )


def _toy_corpus() -> list[str]:
    from vlext.toyworld import ToyWorld

    scenes = ToyWorld(seed=0, image_size=64).scenes(TINY_PIPELINE_CONFIG["corpus_scenes"])
    return [text for s in scenes for text in (s.caption_en, s.caption_zh, *s.phrases("en"), *s.phrases("zh"))]


def _chatglm_tokenizer(folder: Path) -> ChatGLMTokenizer:
    """ChatGLM's tokenizer needs a SentencePiece model file: train a tiny BPE one on toy-world text. Byte
    fallback keeps every string encodable, so prompts outside the corpus still work."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tokenizer.model"
    if not model.is_file():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_toy_corpus()),
            model_prefix=str(folder / "tokenizer"),
            vocab_size=TINY_PIPELINE_CONFIG["chatglm_vocab_size"],
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return ChatGLMTokenizer(vocab_file=str(model))


def tiny_kolors_pipeline(workdir: str | Path, seed: int = 0) -> KolorsPipeline:
    """Kolors-shaped: a ChatGLM text encoder (width 32, penultimate hidden states as text tokens, the last
    layer's last token as the pooled feature), ``encoder_hid_proj`` 32 -> 32 into the UNet, SDXL-style
    added conditions. ``workdir`` receives the SentencePiece model the tokenizer reads."""
    torch.manual_seed(seed)
    tokenizer = _chatglm_tokenizer(Path(workdir) / "chatglm_tokenizer")
    width = TINY_PIPELINE_CONFIG["text_width"]
    glm = ChatGLMConfig(
        hidden_size=width,
        padded_vocab_size=tokenizer.vocab_size,
        torch_dtype="float32",
        **TINY_PIPELINE_CONFIG["chatglm"],
    )
    unet = _sdxl_style_unet(
        cross_attention_dim=width, pooled_dim=width, encoder_hid_dim_type="text_proj", encoder_hid_dim=width
    )
    # ChatGLMModel skips weight init by default (it expects a checkpoint) and its RMSNorm weights are
    # torch.empty either way: initialise everything explicitly so the tiny encoder is deterministic.
    text_encoder = ChatGLMModel(glm, empty_init=False).eval()
    with torch.no_grad():
        for module in text_encoder.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return KolorsPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**TINY_PIPELINE_CONFIG["scheduler"]),
    )


def save_tiny_pipeline(folder: str | Path, kind: str = "sd", seed: int = 0) -> Path:
    """Write a tiny pipeline (``kind`` in sd, sdxl, kolors) with ``save_pretrained``: a ``--pretrained-model``
    folder for the training CLI, its tests and the demo, loadable with ``DiffusionPipeline.from_pretrained``."""
    folder = Path(folder)
    if kind == "sd":
        pipe = tiny_sd_pipeline(seed)
    elif kind == "sdxl":
        pipe = tiny_sdxl_pipeline(seed)
    elif kind == "kolors":
        pipe = tiny_kolors_pipeline(folder.parent / f".{folder.name}_work", seed)
    else:
        raise ValueError(f"kind must be one of 'sd', 'sdxl', 'kolors', got {kind!r}")
    pipe.save_pretrained(folder)
    return folder
