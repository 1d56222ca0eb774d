"""ViT-L depth follows the checkpoint: SPRC's 23 blocks by default, LAVIS's 21 by config, a mismatch is refused.

Built at real width (bert-base Q-Former, CLIP ViT-L/14 at 224 px) on the meta device: shapes only, nothing
allocated, nothing downloaded.
"""

import pytest
import torch
from test_lavis_cir_model import sprc_expected_shapes

import lavis_ext  # noqa: F401  (registers the model)
from lavis_ext.models import clip_vit_l
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt


def clip_vit_l_shapes(depth):
    """CLIP ViT-L/14 visual tower (OpenAI layout, as LAVIS and SPRC name it) without ln_post/proj."""
    shapes = {
        "conv1.weight": (1024, 3, 14, 14),
        "class_embedding": (1024,),
        "positional_embedding": (257, 1024),
        "ln_pre.weight": (1024,),
        "ln_pre.bias": (1024,),
    }
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (1024,),
                p + "ln_1.bias": (1024,),
                p + "attn.in_proj_weight": (3072, 1024),
                p + "attn.in_proj_bias": (3072,),
                p + "attn.out_proj.weight": (1024, 1024),
                p + "attn.out_proj.bias": (1024,),
                p + "ln_2.weight": (1024,),
                p + "ln_2.bias": (1024,),
                p + "mlp.c_fc.weight": (4096, 1024),
                p + "mlp.c_fc.bias": (4096,),
                p + "mlp.c_proj.weight": (1024, 4096),
                p + "mlp.c_proj.bias": (1024,),
            }
        )
    return {f"visual_encoder.{k}": v for k, v in shapes.items()}


def sprc_vit_l_shapes(depth):
    qformer = sprc_expected_shapes(
        hidden=768,
        layers=12,
        intermediate=3072,
        vocab=30523,
        max_pos=512,
        n_query=32,
        embed_dim=256,
        freq=2,
        vision_width=1024,
    )
    return {**clip_vit_l_shapes(depth), **qformer}


@pytest.fixture
def build_vit_l(tmp_path, monkeypatch):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)

    class BertBaseVocab:  # bert-base-uncased vocabulary + SPRC's [DEC]
        def __len__(self):
            return 30523

    monkeypatch.setattr(
        Blip2QformerCirAlignPrompt, "_init_tokenizer", classmethod(lambda cls, b: BertBaseVocab())
    )
    monkeypatch.setattr(clip_vit_l, "CLIP_VIT_L_WEIGHTS", None)  # shapes only: no clip_vit_L.pth download

    def build(depth=None):
        with torch.device("meta"):
            return Blip2QformerCirAlignPrompt(vit_model="clip_L", bert_base=str(tmp_path), vit_depth=depth)

    return build


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_meta_checkpoint(path, shapes, layout="sprc"):
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    torch.save(
        {"epoch": 4, "Blip2QformerCirAlignPrompt": state} if layout == "sprc" else {"model": state}, path
    )
    return path


def test_pretrain_vitl_builds_sprc_depth_23_by_default(build_vit_l):
    assert shapes_of(build_vit_l()) == sprc_vit_l_shapes(23)


def test_vit_depth_21_builds_lavis_blip2_vitl(build_vit_l):
    model = build_vit_l(21)
    assert shapes_of(model) == sprc_vit_l_shapes(21)
    assert len(sprc_vit_l_shapes(23)) - len(shapes_of(model)) == 24  # blocks 21 and 22: 12 tensors each


def test_default_yaml_asks_for_sprc_depth():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("pretrain_vitL")).model
    assert cfg.vit_model == "clip_L" and cfg.vit_depth == 23


def test_sprc_format_vitl_checkpoint_loads_strictly(build_vit_l, tmp_path):
    model = build_vit_l()
    path = save_meta_checkpoint(tmp_path / "sprc_cirr.pt", sprc_vit_l_shapes(23))
    result = model.load_checkpoint(str(path))
    assert result.missing_keys == [] and result.unexpected_keys == []


@pytest.mark.parametrize(("built", "found"), [(21, 23), (23, 21)])
def test_finetuned_checkpoint_of_another_depth_names_depth_and_key(build_vit_l, tmp_path, built, found):
    model = build_vit_l(built)
    path = save_meta_checkpoint(tmp_path / "ckpt.pth", sprc_vit_l_shapes(found), layout="lavis")
    with pytest.raises(
        ValueError,
        match=rf"holds a ViT with {found} blocks but this model was built with {built}.*"
        rf"vit_depth: {found}",
    ):
        model.load_checkpoint(str(path))


def test_pretrained_with_fewer_blocks_loads_more_is_refused(build_vit_l, tmp_path):
    """SPRC starts its 23-block ViT-L from LAVIS's BLIP-2 file; a file with more blocks than built is refused."""
    shallow = save_meta_checkpoint(tmp_path / "lavis.pth", sprc_vit_l_shapes(21), layout="lavis")
    result = build_vit_l(23).load_from_pretrained(str(shallow))
    assert sorted(result.missing_keys) == sorted(set(sprc_vit_l_shapes(23)) - set(sprc_vit_l_shapes(21)))
    deep = save_meta_checkpoint(tmp_path / "sprc.pt", sprc_vit_l_shapes(23))
    with pytest.raises(ValueError, match="holds a ViT with 23 blocks but this model was built with 21"):
        build_vit_l(21).load_from_pretrained(str(deep))


def test_vit_depth_is_refused_for_other_vits():
    with pytest.raises(ValueError, match="vit_depth applies to vit_model 'clip_L' only"):
        Blip2QformerCirAlignPrompt._init_vision("eva_clip_g", 224, 0, False, "fp16", None, 23)


@pytest.mark.parametrize("depth", [0, 24, True])
def test_out_of_range_depth_is_refused(depth):
    with pytest.raises(ValueError, match=r"vit_depth must be an int in \[1, 23\]"):
        clip_vit_l.build_clip_vit_l(224, depth, weights=None)
