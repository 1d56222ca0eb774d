"""blip2_cir_align_prompt: SPRC's model on LAVIS, its Q-Former rules, gated fusion and the inference API."""

import copy
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (registers the model)
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt
from lavis_ext.models.gated_fusion import GatedFusion
from lavis_ext.models.sprc_qformer import SprcBertEmbeddings, to_sprc_qformer

torch.set_num_threads(1)
CAPTIONS = ["make the red circle larger", "remove the green star", "turn the blue square into a star"]


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def sprc_model():
    torch.manual_seed(0)
    return Blip2QformerCirAlignPrompt.from_config(tiny_cfg()).eval()


def fused_copy(model, alpha=0.0):
    """The same weights with gated fusion switched on (new fusion module, alpha as given)."""
    torch.manual_seed(1)
    fused = Blip2QformerCirAlignPrompt.from_config(tiny_cfg(use_gated_fusion=True)).eval()
    result = fused.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("gated_fusion.") for k in result.missing_keys)
    fused.gated_fusion.alpha.data.fill_(alpha)
    return fused


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "target": torch.randn(n, 3, 32, 32, generator=g),
        "text_input": CAPTIONS[:n],
    }


def test_load_model_and_preprocess_builds_tiny_offline():
    from lavis.models import load_model_and_preprocess
    from PIL import Image

    model, vis, txt = load_model_and_preprocess(
        name="blip2_cir_align_prompt", model_type="tiny", is_eval=True
    )
    assert isinstance(model, Blip2QformerCirAlignPrompt)
    assert vis["eval"](Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert txt["eval"]("Make the RED circle!") == "make the red circle"
    # the toy vocabulary is really used: no toy-world word becomes [UNK]
    ids = model.tokenizer("make the red circle larger").input_ids
    assert model.tokenizer.unk_token_id not in ids and len(ids) == 7


def test_unknown_model_type_names_the_accepted_types():
    with pytest.raises(ValueError, match="accepted: \\['coco', 'pretrain', 'pretrain_vitL', 'tiny'\\]"):
        Blip2QformerCirAlignPrompt.default_config_path("large")


@pytest.mark.parametrize(
    ("key", "value"), [("use_gated_fusion", "yes"), ("loss_rtc", "0.4"), ("max_txt_len", 2.5)]
)
def test_config_key_with_wrong_type_is_rejected(key, value):
    with pytest.raises(TypeError, match=f"'{key}' must be"):
        Blip2QformerCirAlignPrompt.from_config(tiny_cfg(**{key: value}))


def test_forward_returns_the_weighted_loss_and_its_components(sprc_model):
    out = sprc_model(batch())
    expected = out["loss_itc"] + 0.4 * out["loss_rtc"] + 0.4 * out["loss_align"]
    assert torch.allclose(out["loss"], expected)
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in ("loss_itc", "loss_rtc", "loss_align"))


def test_loss_weights_come_from_the_config():
    torch.manual_seed(0)
    model = Blip2QformerCirAlignPrompt.from_config(tiny_cfg(loss_rtc=1.0, loss_align=0.0)).eval()
    out = model(batch())
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_rtc"])


def test_gated_fusion_is_identity_at_init(sprc_model):
    fused = fused_copy(sprc_model, alpha=0.0)
    data = batch()
    off, on = sprc_model(data), fused(data)
    for key in off:
        assert torch.equal(off[key], on[key]), key
    targets = sprc_model.extract_target_features(data["target"])
    reference = sprc_model.extract_reference_features(data["image"])
    assert torch.equal(
        sprc_model.inference(reference, targets, CAPTIONS), fused.inference(reference, targets, CAPTIONS)
    )


def test_inference_feeds_the_fused_reference_tokens_to_the_qformer(sprc_model):
    """With alpha != 0, inference equals SPRC scoring the gated-fusion output (the fork forgot this step)."""
    fused = fused_copy(sprc_model, alpha=0.5)
    data = batch()
    targets = sprc_model.extract_target_features(data["target"])
    reference = sprc_model.extract_reference_features(data["image"])
    tokens = fused._tokenize(CAPTIONS)
    words = fused.Qformer.bert.embeddings.word_embeddings(tokens.input_ids)
    fused_reference = fused.gated_fusion(reference, words, tokens.attention_mask).detach()
    assert (fused_reference - reference).abs().mean() > 5e-3
    expected = sprc_model.inference(fused_reference, targets, CAPTIONS)
    assert torch.allclose(fused.inference(reference, targets, CAPTIONS), expected, atol=1e-6)


def test_gradient_reaches_alpha_at_init(sprc_model):
    fused = fused_copy(sprc_model, alpha=0.0).train()
    fused(batch())["loss"].backward()
    assert fused.gated_fusion.alpha.grad is not None and fused.gated_fusion.alpha.grad.abs() > 1e-8
    # exactly one factor starts at zero: the branch layer is non-zero, its gradient is zero only via alpha = 0
    assert fused.gated_fusion.branch.weight.abs().sum() > 0
    assert fused.gated_fusion.branch.weight.grad.abs().sum() == 0


def test_inference_scores_equal_the_ones_forward_trains(sprc_model):
    """The similarity behind forward's loss_itc is the one inference returns, with fusion on (alpha != 0)."""
    fused = fused_copy(sprc_model, alpha=0.7)
    data = batch()
    loss_itc = fused(data)["loss_itc"]
    sim = fused.inference(
        fused.extract_reference_features(data["image"]),
        fused.extract_target_features(data["target"]),
        CAPTIONS,
    )
    recomputed = torch.nn.functional.cross_entropy(sim / fused.temp, torch.arange(3))
    assert torch.allclose(loss_itc, recomputed, atol=1e-6)


def test_fusion_parameter_count_is_reported(sprc_model):
    fused = fused_copy(sprc_model)
    dv, dt = sprc_model.visual_encoder.num_features, sprc_model.Qformer.config.hidden_size
    expected = (dt * dv + dv) + (2 * dv * dv + dv) + (dv * dv + dv) + 1
    assert fused.fusion_parameter_count() == expected
    assert sprc_model.fusion_parameter_count() == 0
    extra = sum(p.numel() for p in fused.parameters()) - sum(p.numel() for p in sprc_model.parameters())
    assert extra == expected


def test_gated_fusion_ignores_padding():
    torch.manual_seed(0)
    fusion = GatedFusion(6, 4, alpha_init=1.0)
    image = torch.randn(1, 3, 6)
    text = torch.randn(1, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    garbage = text.clone()
    garbage[:, 2:] = 100.0
    assert torch.allclose(fusion(image, text, mask), fusion(image, garbage, mask))


def test_target_features_are_normalized_query_features(sprc_model):
    feats = sprc_model.extract_target_features(batch()["target"])
    assert feats.shape == (3, 8, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 8), atol=1e-5)
    assert sprc_model.extract_target_features(batch()["target"], fp16=True).dtype == torch.float16


def test_no_img_embeddings_put_prompts_after_cls_with_positions(sprc_model):
    embeddings = sprc_model.Qformer.bert.embeddings
    assert isinstance(embeddings, SprcBertEmbeddings)
    ids = torch.tensor([[3, 10, 11, 4]])
    prompts = torch.randn(1, 2, 32)
    embeddings.prompt_after_cls = True
    try:
        got = embeddings(input_ids=ids, query_embeds=prompts)
    finally:
        embeddings.prompt_after_cls = False
    words = embeddings.word_embeddings(ids)
    sequence = torch.cat([words[:, :1], prompts, words[:, 1:]], 1) + embeddings.position_embeddings.weight[:6]
    assert torch.allclose(got, embeddings.LayerNorm(sequence), atol=1e-6)


def test_query_feed_forward_only_under_image_cross_attention(sprc_model):
    model = copy.deepcopy(sprc_model)
    ids = model.tokenizer(["make the red circle"], return_tensors="pt").input_ids
    queries = model.query_tokens
    image = torch.randn(1, 17, model.visual_encoder.num_features)

    def run(**kwargs):
        return model.Qformer.bert(ids, query_embeds=queries, return_dict=True, **kwargs).last_hidden_state

    without_image, with_image = run(), run(encoder_hidden_states=image)
    for layer in model.Qformer.bert.encoder.layer:
        layer.intermediate_query.dense.weight.data.mul_(3.0)
    assert torch.equal(run(), without_image)  # SPRC: image-free passes never use the query FFN
    assert not torch.allclose(run(encoder_hidden_states=image), with_image)


def test_to_sprc_qformer_rejects_other_modules():
    with pytest.raises(TypeError, match="BertLMHeadModel"):
        to_sprc_qformer(torch.nn.Linear(2, 2))


def sprc_expected_shapes(
    hidden, layers, intermediate, vocab, max_pos, n_query, embed_dim, freq, vision_width
):
    """SPRC's non-ViT state dict, written from reading its model file and its Qformer.py."""
    shapes = {
        "ln_vision.weight": (vision_width,),
        "ln_vision.bias": (vision_width,),
        "query_tokens": (1, n_query, hidden),
        "prompt_tokens": (1, n_query, hidden),
        "temp": (),
        "vision_proj.weight": (embed_dim, hidden),
        "vision_proj.bias": (embed_dim,),
        "text_proj.weight": (embed_dim, hidden),
        "text_proj.bias": (embed_dim,),
        "itm_head.weight": (2, hidden),
        "itm_head.bias": (2,),
        "Qformer.bert.embeddings.word_embeddings.weight": (vocab, hidden),
        "Qformer.bert.embeddings.position_embeddings.weight": (max_pos, hidden),
        "Qformer.bert.embeddings.position_ids": (1, max_pos),
        "Qformer.bert.embeddings.LayerNorm.weight": (hidden,),
        "Qformer.bert.embeddings.LayerNorm.bias": (hidden,),
        "Qformer.cls.predictions.bias": (vocab,),
        "Qformer.cls.predictions.transform.dense.weight": (hidden, hidden),
        "Qformer.cls.predictions.transform.dense.bias": (hidden,),
        "Qformer.cls.predictions.transform.LayerNorm.weight": (hidden,),
        "Qformer.cls.predictions.transform.LayerNorm.bias": (hidden,),
        "Qformer.cls.predictions.decoder.weight": (vocab, hidden),
        "Qformer.cls.predictions.decoder.bias": (vocab,),
    }
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % freq == 0 else [])
        for block in blocks:
            kv_in = vision_width if block == "crossattention" else hidden
            for name, fan_in in (("query", hidden), ("key", kv_in), ("value", kv_in)):
                shapes[f"{p}{block}.self.{name}.weight"] = (hidden, fan_in)
                shapes[f"{p}{block}.self.{name}.bias"] = (hidden,)
            shapes[f"{p}{block}.output.dense.weight"] = (hidden, hidden)
            shapes[f"{p}{block}.output.dense.bias"] = (hidden,)
            shapes[f"{p}{block}.output.LayerNorm.weight"] = (hidden,)
            shapes[f"{p}{block}.output.LayerNorm.bias"] = (hidden,)
        for suffix in ("", "_query"):
            shapes[f"{p}intermediate{suffix}.dense.weight"] = (intermediate, hidden)
            shapes[f"{p}intermediate{suffix}.dense.bias"] = (intermediate,)
            shapes[f"{p}output{suffix}.dense.weight"] = (hidden, intermediate)
            shapes[f"{p}output{suffix}.dense.bias"] = (hidden,)
            shapes[f"{p}output{suffix}.LayerNorm.weight"] = (hidden,)
            shapes[f"{p}output{suffix}.LayerNorm.bias"] = (hidden,)
    return shapes


def non_vit_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")}


def test_state_dict_matches_sprc_at_tiny_width(sprc_model):
    expected = sprc_expected_shapes(
        hidden=32,
        layers=2,
        intermediate=64,
        vocab=len(sprc_model.tokenizer),
        max_pos=64,
        n_query=8,
        embed_dim=32,
        freq=2,
        vision_width=48,
    )
    assert non_vit_shapes(sprc_model) == expected


def test_state_dict_matches_sprc_at_real_width_on_meta_device(tmp_path, monkeypatch):
    """bert-base Q-Former + EVA ViT-g width, shapes only: built on the meta device, nothing allocated."""
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)  # transformers' BertConfig defaults are bert-base-uncased

    class BertBaseVocab:  # bert-base-uncased vocabulary + SPRC's [DEC]
        def __len__(self):
            return 30523

    class EvaGWidth(torch.nn.Module):  # ViT weights are LAVIS's own; only their width matters here
        num_features = 1408

    def eva_g_shaped(cls, *args):
        return EvaGWidth(), torch.nn.LayerNorm(1408)

    monkeypatch.setattr(
        Blip2QformerCirAlignPrompt, "_init_tokenizer", classmethod(lambda cls, b: BertBaseVocab())
    )
    monkeypatch.setattr(Blip2QformerCirAlignPrompt, "_init_vision", classmethod(eva_g_shaped))
    with torch.device("meta"):
        model = Blip2QformerCirAlignPrompt(bert_base=str(tmp_path))
    assert next(model.parameters()).device.type == "meta"
    expected = sprc_expected_shapes(
        hidden=768,
        layers=12,
        intermediate=3072,
        vocab=30523,
        max_pos=512,
        n_query=32,
        embed_dim=256,
        freq=2,
        vision_width=1408,
    )
    assert non_vit_shapes(model) == expected


def test_mismatched_reference_and_target_counts_are_rejected(sprc_model):
    data = batch()
    data["target"] = data["target"][:2]
    with pytest.raises(ValueError, match="3 reference images, 2 target images, 3 captions"):
        sprc_model(data)
    with pytest.raises(ValueError, match="2 reference images but 3 captions"):
        sprc_model.extract_composed_features(torch.randn(2, 17, 48), CAPTIONS)


def test_empty_batch_is_rejected(sprc_model):
    with pytest.raises(ValueError, match="empty batch"):
        sprc_model(
            {"image": torch.zeros(0, 3, 32, 32), "target": torch.zeros(0, 3, 32, 32), "text_input": []}
        )


def test_long_captions_are_truncated_with_one_warning():
    torch.manual_seed(0)
    model = Blip2QformerCirAlignPrompt.from_config(tiny_cfg(max_txt_len=6)).eval()
    long = ["make the red circle larger and move the blue star to the left"] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = model._tokenize(long)
        model._tokenize(long)
    assert tokens.input_ids.shape == (2, 6)
    assert sum("truncated to max_txt_len=6" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(None, 1), (1, None), (3, 7), (64, 5), (4, 100)])
def test_chunked_similarity_is_bit_identical_to_unchunked(query_chunk, gallery_chunk):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 33, generator=g)
    targets = torch.randn(101, 5, 33, generator=g)
    full = Blip2QformerCirAlignPrompt.similarity(queries, targets)
    chunked = Blip2QformerCirAlignPrompt.similarity(queries, targets, query_chunk, gallery_chunk)
    assert torch.equal(chunked, full)
    # and both are the max-over-query-tokens dot product (checked in float64)
    reference = torch.einsum("bd,nqd->bnq", queries.double(), targets.double()).amax(-1)
    assert torch.allclose(full.double(), reference, atol=1e-4)


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(32, 48), (16, 16), (64, 7), (5, 96)])
def test_chunked_similarity_is_bit_identical_at_real_width(query_chunk, gallery_chunk):
    """Q = 32, D = 256 as in the real model: aligned blocks are scored without any padding copy."""
    g = torch.Generator().manual_seed(2)
    queries = torch.nn.functional.normalize(torch.randn(64, 256, generator=g), dim=-1)
    targets = torch.nn.functional.normalize(torch.randn(96, 32, 256, generator=g), dim=-1)
    full = Blip2QformerCirAlignPrompt.similarity(queries, targets)
    assert torch.equal(
        Blip2QformerCirAlignPrompt.similarity(queries, targets, query_chunk, gallery_chunk), full
    )


def test_chunked_similarity_casts_an_fp16_gallery_per_block():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(9, 16, generator=g)
    targets = torch.randn(23, 4, 16, generator=g).half()
    full = Blip2QformerCirAlignPrompt.similarity(queries, targets.float())
    assert torch.equal(Blip2QformerCirAlignPrompt.similarity(queries, targets, gallery_chunk=6), full)


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_similarity_rejects_bad_chunks(chunk):
    with pytest.raises(ValueError, match="gallery_chunk must be a positive int or None"):
        Blip2QformerCirAlignPrompt.similarity(torch.randn(2, 4), torch.randn(3, 2, 4), gallery_chunk=chunk)


def test_similarity_rejects_mismatched_widths():
    with pytest.raises(ValueError, match=r"same D, got \(2, 4\) and \(3, 2, 5\)"):
        Blip2QformerCirAlignPrompt.similarity(torch.randn(2, 4), torch.randn(3, 2, 5))
