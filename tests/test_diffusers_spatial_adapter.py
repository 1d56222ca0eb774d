"""SpatialAdapter: zero-init identity, learnability, refusal rules, install/remove, save/load, bad input."""

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from diffusers_ext.gated_self_attention import GatedSelfAttnProcessor
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_unet import tiny_unet

torch.set_num_threads(1)
PHRASE_DIM = 16


def make(**config):
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=PHRASE_DIM, hidden_dim=32, **config)
    return unet, adapter


def inputs(batch=2, n_objs=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:batch])
    text = torch.randn(batch, 5, 32, generator=g)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.2, 0.9, 0.8], [0.0, 0.6, 0.3, 1.0]])[:n_objs]
    boxes = boxes.expand(batch, -1, -1).clone()
    phrases = torch.randn(batch, n_objs, PHRASE_DIM, generator=g)
    return x, t, text, boxes, phrases


@pytest.mark.parametrize("mode", ["gate", "zero_out"])
def test_output_equals_plain_unet_at_init(mode):
    unet, adapter = make(init_mode=mode)
    x, t, text, boxes, phrases = inputs()
    with torch.no_grad():
        plain = unet(x, t, text).sample
        adapter.install(unet)
        grounded = unet(
            x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)
        ).sample
    assert (grounded - plain).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "mode, learns",
    [("gate", ["alpha_attn", "alpha_dense"]), ("zero_out", ["to_out.weight", "ff_out.weight"])],
)
def test_one_optimizer_step_from_init_moves_the_adapter(mode, learns):
    unet, adapter = make(init_mode=mode)
    adapter.install(unet)
    x, t, text, boxes, phrases = inputs()
    before = {k: v.clone() for k, v in adapter.fusers[0].state_dict().items()}
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    out = unet(x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)).sample
    (out - torch.ones_like(out)).pow(2).mean().backward()
    opt.step()
    after = adapter.fusers[0].state_dict()
    for name in learns:
        assert not torch.equal(before[name], after[name]), f"{name} did not move in {mode} mode"
    if mode == "gate":
        assert adapter.gate_stats()["mean"] != 0.0


@pytest.mark.parametrize(
    "config",
    [{"init_mode": "zero_out", "gate_init": 0.0}, {"init_mode": "gate", "freeze_gate": True}],
)
def test_configs_that_can_never_learn_are_refused(config):
    with pytest.raises(ValueError, match="can never learn"):
        make(**config)


def test_frozen_nonzero_gate_is_allowed_and_not_trained():
    unet, adapter = make(init_mode="zero_out", freeze_gate=True)
    assert not adapter.fusers[0].alpha_attn.requires_grad
    assert adapter.fusers[0].to_out.weight.requires_grad


def test_unknown_init_mode_is_refused():
    with pytest.raises(ValueError, match="init_mode must be one of"):
        make(init_mode="zeros")


def test_gate_stats_report_tanh_of_alphas():
    _, adapter = make()
    with torch.no_grad():
        for i, fuser in enumerate(adapter.fusers):
            fuser.alpha_attn.fill_(0.1 * i)
            fuser.alpha_dense.fill_(-0.1 * i)
    gates = torch.tensor([[0.1 * i, -0.1 * i] for i in range(len(adapter.fusers))]).tanh()
    stats = adapter.gate_stats()
    assert stats["mean"] == pytest.approx(gates.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(gates.flatten().std().item(), abs=1e-6)
    assert stats["max"] == pytest.approx(gates.max().item(), abs=1e-6)
    assert stats["min"] == pytest.approx(gates.min().item(), abs=1e-6)
    assert len(stats["per_layer"]) == len(adapter.fusers) == 7


def test_weights_live_in_the_unet_state_dict_while_installed():
    unet, adapter = make()
    adapter.install(unet)
    keys = [k for k in unet.state_dict() if ".attn1.processor." in k]
    assert len(keys) == len(adapter.fusers) * len(adapter.fusers[0].state_dict())


def test_gate_scale_zero_and_no_tokens_give_the_plain_unet():
    unet, adapter = make()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3)
    x, t, text, boxes, phrases = inputs()
    with torch.no_grad():
        plain = unet(x, t, text).sample
        adapter.install(unet)
        no_tokens = unet(x, t, text).sample
        scaled_off = unet(
            x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases, gate_scale=0.0)
        ).sample
        on = unet(x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)).sample
    assert (no_tokens - plain).abs().max().item() <= 1e-6
    assert (scaled_off - plain).abs().max().item() <= 1e-6
    assert (on - plain).abs().max().item() > 1e-3


def test_save_and_load_round_trip(tmp_path):
    unet, adapter = make(init_mode="zero_out", gate_init=0.5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = SpatialAdapter.from_pretrained(tmp_path)
    assert loaded.config.layers == adapter.config.layers
    for (k, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x, t, text, boxes, phrases = inputs()
    with torch.no_grad():
        adapter.install(unet)
        ref = unet(x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)).sample
        adapter.remove()
        loaded.install(unet)
        out = unet(x, t, text, cross_attention_kwargs=loaded.cross_attention_kwargs(boxes, phrases)).sample
    assert torch.equal(ref, out)


def test_remove_restores_the_previous_processors():
    unet, adapter = make()
    unet.set_attn_processor(AttnProcessor())
    before = dict(unet.attn_processors)
    adapter.install(unet)
    procs = unet.attn_processors
    assert sum(isinstance(p, GatedSelfAttnProcessor) for p in procs.values()) == 7
    assert all(procs[k] is before[k] for k in before if k.endswith("attn2.processor"))  # attn2 untouched
    adapter.remove()
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not any(".processor." in k for k in unet.state_dict())


def test_attn2_keeps_running_the_previous_processor():
    unet, adapter = make()
    x, t, text, boxes, phrases = inputs()
    unet.set_attn_processor(AttnProcessor())
    adapter.install(unet)
    attn2 = unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
    assert type(attn2) is AttnProcessor
    with torch.no_grad():
        out = unet(x, t, text).sample
        adapter.remove()
        unet.set_attn_processor(AttnProcessor2_0())
        ref = unet(x, t, text).sample
    assert (out - ref).abs().max().item() <= 1e-5


def test_peft_lora_on_the_unet_works_beside_the_adapter():
    from peft import LoraConfig

    unet, adapter = make()
    unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    x, t, text, boxes, phrases = inputs()
    with torch.no_grad():
        with_lora = unet(x, t, text).sample
        adapter.install(unet)
        grounded = unet(
            x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)
        ).sample
        unet.disable_adapters()
        without_lora = unet(
            x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases)
        ).sample
    assert (grounded - with_lora).abs().max().item() <= 1e-6  # identity at init, LoRA active
    assert (grounded - without_lora).abs().max().item() > 1e-4  # LoRA really changes the result


def test_a_swapped_processor_is_detected():
    unet, adapter = make()
    adapter.install(unet)
    unet.set_attn_processor(AttnProcessor2_0())  # what enabling xformers or attention slicing does
    with pytest.raises(RuntimeError, match="replaced after install"):
        adapter.check_installed()
    x, t, text, *_ = inputs()
    with pytest.warns(UserWarning, match="adapter is inactive"), torch.no_grad():
        unet(x, t, text)


def test_installing_twice_is_refused():
    unet, adapter = make()
    adapter.install(unet)
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install(unet)


def test_a_chosen_subset_of_blocks():
    unet = tiny_unet()
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=PHRASE_DIM, layers=["mid_block", "up_blocks.1"])
    assert sorted(adapter.layer_names) == [
        "mid_block.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
    ]
    with pytest.raises(
        ValueError, match=r"\['down_blocks.7'\] are neither a fuser preset nor a block-name prefix"
    ):
        SpatialAdapter.for_unet(unet, phrase_dim=PHRASE_DIM, layers=["down_blocks.7"])


def test_a_unet_without_transformer_blocks_is_refused():
    unet = tiny_unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )
    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        SpatialAdapter.for_unet(unet, phrase_dim=PHRASE_DIM)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b, p: (b * 2, p), "outside \\[0, 1\\]"),
        (lambda b, p: (b[..., [2, 1, 0, 3]], p), "x1 <= x0"),
        (lambda b, p: (b.index_fill(2, torch.tensor([0]), float("nan")), p), "NaN or inf"),
        (lambda b, p: (b, p[:, :2]), "one phrase per box"),
        (lambda b, p: (b, torch.randn(2, 3, PHRASE_DIM + 1)), "does not match the tokenizer's phrase_dim"),
        (lambda b, p: (b.repeat(1, 11, 1), p.repeat(1, 11, 1)), "max_objs is 30"),
    ],
)
def test_bad_grounding_input_is_refused_before_any_work(edit, message):
    _, adapter = make()
    *_, boxes, phrases = inputs()
    boxes, phrases = edit(boxes, phrases)
    with pytest.raises(ValueError, match=message):
        adapter(boxes, phrases)


def test_cfg_unconditional_half_sees_null_tokens():
    _, adapter = make()
    *_, boxes, phrases = inputs(batch=1)
    masks = torch.zeros(1, 3)
    dropped = adapter(boxes, phrases, masks)
    null = adapter.position_net.null_tokens(1)  # max_objs = 30 slots, as GLIGEN feeds them
    assert torch.allclose(dropped, null, atol=1e-6)
    assert not torch.allclose(adapter(boxes, phrases), null, atol=1e-3)


def test_no_unused_kwarg_warning_with_pass_through(caplog):
    unet, adapter = make()
    adapter.install(unet)
    x, t, text, boxes, phrases = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            unet(x, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases))
    assert "are not expected" not in caplog.text


def test_a_second_adapter_on_an_adapted_unet_is_refused_and_removal_leaves_no_orphans():
    unet, first = make()
    _, second = make()
    x, t, text, *_ = inputs()
    with torch.no_grad():
        plain = unet(x, t, text).sample
    first.install(unet)
    with pytest.raises(RuntimeError, match="already carries a SpatialAdapter"):
        second.install(unet)
    first.remove()
    assert not any(isinstance(p, GatedSelfAttnProcessor) for p in unet.attn_processors.values())
    second.install(unet)  # the UNet is free again
    second.remove()
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, plain)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "1.0", None, True])
def test_non_finite_or_non_numeric_gate_scale_is_refused_everywhere(bad):
    unet, adapter = make()
    adapter.install(unet)
    x, t, text, boxes, phrases = inputs()
    with pytest.raises(ValueError, match="finite real number"):
        adapter.cross_attention_kwargs(boxes, phrases, gate_scale=bad)
    with pytest.raises(ValueError, match="finite real number"):
        adapter.set_scale(bad)
    raw = {"grounding_tokens": adapter(boxes, phrases), "grounding_scale": bad}
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['grounding_scale'\] must be a finite"):
        unet(x, t, text, cross_attention_kwargs=raw)


def test_boxes_as_nested_lists_give_the_same_tokens_as_tensors():
    _, adapter = make()
    *_, boxes, phrases = inputs()
    as_lists = adapter(boxes.tolist(), phrases, [[1, 1, 0], [1, 0, 1]])
    as_tensors = adapter(boxes, phrases, torch.tensor([[1.0, 1, 0], [1, 0, 1]]))
    assert torch.equal(as_lists, as_tensors)
    kw = adapter.cross_attention_kwargs((tuple(map(tuple, boxes[0].tolist())),), phrases[:1].tolist(), None)
    assert torch.allclose(kw["grounding_tokens"], adapter(boxes[:1], phrases[:1]), atol=1e-6)
    with pytest.raises(ValueError, match=r"one layout of shape \(objects, 4\): wrap it"):
        adapter(boxes[0].tolist(), phrases[0])
    with pytest.raises(ValueError, match="nested list of numbers"):
        adapter([[0.1, 0.1, 0.5], [0.1, 0.1, 0.5, 0.5]], phrases[:1, :2])


def test_layouts_always_fill_max_objs_slots_and_other_counts_are_refused():
    unet, adapter = make()
    adapter.install(unet)
    x, t, text, boxes, phrases = inputs()
    tokens = adapter(boxes, phrases)
    assert tokens.shape == (2, 30, adapter.config.token_dim)
    null = adapter.position_net.null_tokens(2)
    assert torch.allclose(tokens[:, 3:], null[:, 3:], atol=1e-6)  # padding slots are the masked null tokens
    with pytest.raises(ValueError, match="max_objs=30 slots"):
        unet(x, t, text, cross_attention_kwargs={"grounding_tokens": tokens[:, :3], "grounding_scale": 1.0})


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[0.1, 0.1, 0.1, 0.5]], "x1 <= x0 or y1 <= y0"),
        ([[0.1, 0.5, 0.4, 0.5]], "x1 <= x0 or y1 <= y0"),
        ([[-0.01, 0.1, 0.4, 0.5]], r"outside \[0, 1\]"),
        ([[0.1, 0.1, 0.4, 1.01]], "never clamped"),
    ],
)
def test_the_box_rule_refuses_instead_of_clamping(boxes, message):
    _, adapter = make()
    with pytest.raises(ValueError, match=message):
        adapter([boxes], torch.zeros(1, 1, PHRASE_DIM))


def test_gradient_checkpointing_passes_grounding_through_positional_kwargs():
    unet, adapter = make()
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(0.5)
    adapter.install(unet)
    x, t, text, boxes, phrases = inputs()
    kw = adapter.cross_attention_kwargs(boxes, phrases)
    unet.train()
    reference = unet(x, t, text, cross_attention_kwargs=kw).sample
    unet.enable_gradient_checkpointing()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpointed = unet(x, t, text, cross_attention_kwargs=kw).sample
    checkpointed.mean().backward()
    assert (checkpointed - reference).abs().max().item() <= 1e-6
    assert adapter.fusers[0].alpha_attn.grad is not None and adapter.fusers[0].alpha_attn.grad != 0
