"""Tiny random-weight zero-shot detectors saved as folders, loadable with ``--detector <folder>``.

They prove the wiring of ``diffusers_ext.evaluation.detectors.ZeroShotDetector`` (processor, model outputs, box
conversion, phrase matching) offline: the real OWLv2 / Grounding DINO configurations with tiny widths,
and tokenizers written on the spot (a byte-level CLIP BPE vocabulary without merges for OWLv2; a
WordPiece vocabulary of the characters needed for Grounding DINO). Random weights detect nothing in
particular; shapes and the path through transformers' Auto classes are what is tested.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_DETECTOR_CONFIG", "save_tiny_grounding_dino", "save_tiny_owlv2"]

TINY_DETECTOR_CONFIG = {
    "owlv2": {
        "text": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        "vision": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "projection_dim": 16,
    },
    "grounding_dino": {
        # Swin backbone with two stages -> two feature levels; d_model 32 (its GroupNorms use 32 groups);
        # two decoder layers (the box heads of layers 1.. are tied to layer 0's, which needs a second one)
        "backbone": {
            "image_size": 32,
            "patch_size": 4,
            "embed_dim": 8,
            "depths": [1, 1],
            "num_heads": [1, 1],
            "window_size": 2,
            "out_features": ["stage1", "stage2"],
        },
        "text": {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
        },
        "model": {
            "num_queries": 12,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "encoder_ffn_dim": 32,
            "decoder_ffn_dim": 32,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "d_model": 32,
            "num_feature_levels": 2,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
            "max_text_len": 64,
        },
        "image_size": {"shortest_edge": 32, "longest_edge": 64},
    },
}


def save_tiny_owlv2(folder: str | Path, seed: int = 0) -> Path:
    """An ``Owlv2ForObjectDetection`` (16-wide, one layer each, 32-pixel images, 16 patches) with its
    ``Owlv2Processor`` in ``folder``."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from diffusers_ext.testing.tiny_pipelines import tiny_clip_tokenizer

    cfg = TINY_DETECTOR_CONFIG["owlv2"]
    tokenizer = tiny_clip_tokenizer(max_length=cfg["text"]["max_position_embeddings"])
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Owlv2Config(
        text_config={**cfg["text"], **ids}, vision_config=cfg["vision"], projection_dim=cfg["projection_dim"]
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    # random logit scale/shift heads saturate every score at 1.0 (ties everywhere); with them at zero the
    # logits are the cosine similarities of patch and query embeddings, distinct scores in (0.27, 0.73)
    with torch.no_grad():
        for head in (model.class_head.logit_shift, model.class_head.logit_scale):
            head.weight.zero_()
            head.bias.zero_()
    size = cfg["vision"]["image_size"]
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _wordpiece_vocab() -> dict[str, int]:
    """BERT special tokens, single lowercase letters, digits and punctuation, and their ``##`` forms: every
    English phrase tokenizes, letter by letter, into known ids."""
    import string

    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'-")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    return {t: i for i, t in enumerate(tokens)}


def save_tiny_grounding_dino(folder: str | Path, seed: int = 0) -> Path:
    """A ``GroundingDinoForObjectDetection`` (Swin 8-wide, BERT 16-wide, d_model 32, 12 queries) with its
    ``GroundingDinoProcessor`` (a letter-level WordPiece tokenizer) in ``folder``."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    cfg = TINY_DETECTOR_CONFIG["grounding_dino"]
    vocab = _wordpiece_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=cfg["text"]["max_position_embeddings"])
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(**cfg["backbone"]),
        text_config=BertConfig(vocab_size=len(vocab), **cfg["text"]),
        **cfg["model"],
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size=cfg["image_size"]), tokenizer=tokenizer
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
