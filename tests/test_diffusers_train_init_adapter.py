"""``--init-adapter`` (issue 28): the trainer starts from published adapter weights (GLIGEN-XL's diffusers gated
SDXL UNet, an adapter our trainer saved) instead of a fresh adapter, trains them with the usual levers, and
refuses what cannot work (a missing source, fresh-adapter flags, a shape that is not the loaded one, a source
that does not fit the pipeline, a resume from another source) before the pipeline loads or anything is
deleted."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from trainer_runs import train_fresh

from diffusers_ext import SpatialAdapter, load_spatial_adapter
from diffusers_ext.gligen_conversion import adapter_to_gated_state_dict
from diffusers_ext.spatial_adapter import transformer_blocks
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.testing.tiny_unet import open_gated_unet
from diffusers_ext.training import init_adapter as init_module
from diffusers_ext.training import train_spatial_adapter as trainer
from diffusers_ext.training.train_spatial_adapter import parse_args
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)

FUSER = "mid_block.attentions.0.transformer_blocks.0.fuser.attn.to_q.weight"


def _gated_unet_like(unet_config: dict) -> UNet2DConditionModel:
    """A diffusers gated UNet with the pipeline UNet's config (GLIGEN-XL's format at tiny size), random base
    weights, gates opened and null features moved so that its fusers are not an identity."""
    return open_gated_unet(unet_config)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("init-adapter")
    sdxl = save_tiny_pipeline(root / "sdxl", "sdxl")
    gated = _gated_unet_like(json.loads((sdxl / "unet" / "config.json").read_text()))
    gated.save_pretrained(root / "gligen-xl" / "unet")  # the hub layout: <repo>/unet/config.json
    return {"jsonl": write_grounding_jsonl(root / "data", 4, seed=0, image_size=64), "sdxl": sdxl,
            "sd": save_tiny_pipeline(root / "sd", "sd"), "gated": gated, "gligen_xl": root / "gligen-xl",
            "root": root}  # fmt: skip


def _argv(toy, out, *extra, model="sdxl"):
    return ["--mixed-data", str(toy["jsonl"]), "--pretrained-model", str(toy[model]), "--output-dir", str(out),
            "--batch-size", "2", "--lr", "1e-3", *extra]  # fmt: skip


def _gligen_xl(toy):
    return ["--init-adapter", str(toy["gligen_xl"]), "--init-adapter-subfolder", "unet"]


def _spy_on_build(monkeypatch):
    """What the adapter (and its EMA) hold when ``build_trainables`` hands them over, before the first step."""
    seen = {}
    real = trainer.build_trainables

    def spy(args, pipe, placement, **kwargs):
        t = real(args, pipe, placement, **kwargs)
        if not t.adapter.config.phrase_norm:  # GLIGEN's format has no phrase LayerNorm
            seen["gated"] = {
                k: v.detach().float().clone() for k, v in adapter_to_gated_state_dict(t.adapter).items()
            }
        seen["adapter"] = {k: v.detach().float().clone() for k, v in t.adapter.state_dict().items()}
        seen["conv_in"] = pipe.unet.conv_in.weight.detach().clone()
        if t.ema is not None:
            seen["ema"] = [p.detach().clone() for p in t.ema.shadow_params]
            seen["params"] = [p.detach().float().clone() for p in t.adapter.parameters()]
        return t

    monkeypatch.setattr(trainer, "build_trainables", spy)
    return seen


def _no_pipeline_load(monkeypatch):
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", None)  # loading would be a TypeError


@pytest.fixture(scope="module")
def gligen_xl_run(toy):
    out = toy["root"] / "gligen-xl-run"
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_build(mp)
        result = train_fresh(_argv(toy, out, *_gligen_xl(toy), "--max-train-steps", "2", "--checkpointing-steps", "1",
                              "--lora-rank", "2", "--ema"))  # fmt: skip
    return out, seen, result


@pytest.fixture(scope="module")
def our_run(toy):
    """A first run of our own on the tiny SD pipeline (a small adapter: 16 wide, 4 objects, 'mid' only)."""
    out = toy["root"] / "our-run"
    train_fresh(_argv(toy, out, "--hidden-dim", "16", "--max-objs", "4", "--layers", "mid", "--max-train-steps", "1",
                 model="sd"))  # fmt: skip
    return out


# ---- starting from GLIGEN-XL's format ----------------------------------------------------------------------


def test_a_gated_sdxl_unet_is_the_first_step_s_adapter_and_trains_on(toy, gligen_xl_run):
    out, seen, result = gligen_xl_run
    gated = toy["gated"].state_dict()
    grounding = {k: v for k, v in gated.items() if ".fuser." in k or k.startswith("position_net.")}
    assert set(seen["gated"]) == set(grounding)
    for key in (FUSER, "mid_block.attentions.0.transformer_blocks.0.fuser.alpha_attn",
                "position_net.linears.0.weight"):  # fmt: skip
        assert torch.equal(seen["gated"][key], gated[key].float()), key
    assert all(torch.equal(seen["gated"][k], v.float()) for k, v in grounding.items())
    # gates open: the loaded adapter is not an identity, so equal weights mean something
    assert float(gated["mid_block.attentions.0.transformer_blocks.0.fuser.alpha_attn"]) > 0.3
    # the EMA starts from the loaded weights, not from a fresh adapter's
    assert all(torch.equal(e, p) for e, p in zip(seen["ema"], seen["params"], strict=True))
    # only the grounding is taken: --pretrained-model's UNet keeps its own base weights
    assert not torch.equal(seen["conv_in"], gated["conv_in.weight"])
    assert result["steps"] == 2 and all(math.isfinite(x) for x in result["losses"])
    assert any("lora_" in n for n in result["trainable"])
    assert result["gate_stats"]["min"] > 0.2  # the opened gates stayed open: nothing was re-initialised


def test_the_adapter_trained_from_gligen_xl_loads_back_with_its_blocks(toy, gligen_xl_run):
    out, seen, _ = gligen_xl_run
    pipe = DiffusionPipeline.from_pretrained(toy["sdxl"])
    adapter = load_spatial_adapter(pipe, out / "adapter")
    blocks = sorted(n for n, b in transformer_blocks(toy["gated"]).items() if b.fuser is not None)
    assert sorted(adapter.layer_names) == blocks
    assert (
        adapter.config.max_objs == 30 and adapter.config.hidden_dim == 512 and not adapter.config.phrase_norm
    )
    trained = adapter_to_gated_state_dict(adapter)
    assert not torch.equal(trained[FUSER], seen["gated"][FUSER])  # two steps moved it
    flags = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    assert flags["init_adapter"] == str(toy["gligen_xl"].resolve())
    assert (flags["init_adapter_subfolder"], flags["max_objs"], flags["hidden_dim"]) == ("unet", 30, 512)
    assert sorted(flags["layers"]) == blocks


def test_init_adapter_base_unet_takes_the_gated_unet_s_base_weights(toy, tmp_path, monkeypatch):
    seen = _spy_on_build(monkeypatch)
    train_fresh(
        _argv(toy, tmp_path / "out", *_gligen_xl(toy), "--init-adapter-base-unet", "--max-train-steps", "1")
    )
    assert torch.equal(seen["conv_in"], toy["gated"].state_dict()["conv_in.weight"])


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="--use-8bit-adam needs bitsandbytes"
)
def test_gligen_xl_fine_tunes_with_the_documented_24_gb_levers(toy, tmp_path, monkeypatch):
    """docs/gligen_xl.md's command line, at the tiny size: every memory lever with the gated UNet as init."""
    seen = _spy_on_build(monkeypatch)
    out = tmp_path / "ft"
    result = train_fresh(_argv(toy, out, *_gligen_xl(toy), "--resolution", "64", "--mixed-precision", "bf16",
                          "--bf16-adapter", "--use-8bit-adam", "--gradient-checkpointing", "--cache-dir",
                          str(tmp_path / "cache"), "--cache-latents", "--batch-size", "1",
                          "--gradient-accumulation-steps", "2", "--max-train-steps", "1"))  # fmt: skip
    gated = toy["gated"].state_dict()
    assert torch.equal(seen["gated"][FUSER], gated[FUSER].to(torch.bfloat16).float())  # bf16 on the device
    assert result["steps"] == 1 and math.isfinite(result["losses"][0]) and result["gradient_checkpointing"]
    assert result["placement"].table()["adapter"][1] == torch.bfloat16 and result["on_device"] == [
        "UNet2DConditionModel"
    ]
    loaded = load_spatial_adapter(DiffusionPipeline.from_pretrained(toy["sdxl"]), out / "adapter")
    assert sorted(loaded.layer_names) == sorted(
        n for n, b in transformer_blocks(toy["gated"]).items() if b.fuser is not None
    )


def test_gligen_xl_s_published_layout_is_described_before_any_weights_load(tmp_path):
    """At SDXL's published width (configs only, the meta device): GLIGEN-XL's hub layout (a gated SDXL
    ``unet/config.json``) gives the trainer its 70-block placement, 512-wide tokenizer and 30 objects before
    anything is read, and an SD1.5 --pretrained-model is refused naming the block it lacks."""
    from diffusers_ext.testing.published_unets import SD15, SDXL

    def folder(path, config):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))

    folder(tmp_path / "gligen-xl-1024" / "unet", {**SDXL, "attention_type": "gated"})
    folder(tmp_path / "sdxl" / "unet", SDXL)
    folder(tmp_path / "sd15" / "unet", SD15)

    def argv(model):
        return ["--mixed-data", "rows.jsonl", "--pretrained-model", str(tmp_path / model), "--output-dir", "out",
                "--init-adapter", str(tmp_path / "gligen-xl-1024"), "--init-adapter-subfolder", "unet"]  # fmt: skip

    args = parse_args(argv("sdxl"))
    config = init_module.check_before_loading(args, init_module.given_flags(argv("sdxl")))
    assert len(args.layers) == 70 and (args.hidden_dim, args.max_objs) == (512, 30)
    assert (config["phrase_dim"], config["token_dim"], config["phrase_norm"]) == (2048, 2048, False)
    args = parse_args(argv("sd15"))
    with pytest.raises(
        SystemExit,
        match=r"--pretrained-model .*sd15's UNet: fuser 'down_blocks.1.attentions.0.transformer_blocks.1' has no matching transformer block in this UNet$",
    ):
        init_module.check_before_loading(args, set())


# ---- starting from an adapter our trainer saved --------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="--use-8bit-adam needs bitsandbytes"
)
def test_a_second_run_starts_from_the_first_run_s_adapter_with_the_memory_levers(toy, our_run, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    seen = _spy_on_build(monkeypatch)
    out = tmp_path / "second"
    first = load_file(str(our_run / "adapter" / "diffusion_pytorch_model.safetensors"))
    result = train_fresh(_argv(toy, out, "--init-adapter", str(our_run / "adapter"), "--max-train-steps", "1",
                          "--mixed-precision", "bf16", "--bf16-adapter", "--use-8bit-adam", "--ema",
                          "--gradient-accumulation-steps", "2", "--batch-size", "1",
                          "--cache-dir", str(tmp_path / "cache"), "--cache-latents", "--checkpointing-steps", "1",
                          model="sd"))  # fmt: skip
    # the first step starts from the saved weights (bf16 on the device, so compared at bf16)
    assert set(seen["adapter"]) == set(first)
    assert all(torch.equal(seen["adapter"][k], v.to(torch.bfloat16).float()) for k, v in first.items())
    assert result["steps"] == 1 and math.isfinite(result["losses"][0])
    # --hidden-dim, --max-objs and --layers came from the loaded adapter, not from the defaults (512, 30, all)
    flags = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    assert (flags["hidden_dim"], flags["max_objs"], flags["layers"]) == (
        16,
        4,
        ["mid_block.attentions.0.transformer_blocks.0"],
    )
    again = load_spatial_adapter(DiffusionPipeline.from_pretrained(toy["sd"]), out / "adapter")
    assert again.layer_names == ["mid_block.attentions.0.transformer_blocks.0"]
    assert again.config.hidden_dim == 16 and again.config.max_objs == 4


def test_given_shape_flags_equal_to_the_loaded_adapter_s_are_accepted(toy, our_run):
    argv = _argv(toy, "out", "--init-adapter", str(our_run / "adapter"), "--layers", "mid", "--hidden-dim", "16",
                 "--max-objs", "4", model="sd")  # fmt: skip
    args = parse_args(argv)
    config = init_module.check_before_loading(args, init_module.given_flags(argv))
    assert config["hidden_dim"] == 16 and args.layers == ["mid_block.attentions.0.transformer_blocks.0"]


# ---- refusals before the pipeline loads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--init-adapter {root}/nowhere: no such file or folder, and not a hub repo id (owner/name)"),
        ("subfolder", "--init-adapter {root}/gligen-xl (--init-adapter-subfolder transformer): {root}/gligen-xl "
                      "has no folder 'transformer' (found ['unet'])"),
        ("init-mode", "--init-mode with --init-adapter {ours}: these set how a new adapter's weights start"),
        ("gate-init", "--gate-init-value with --init-adapter {ours}: these set how a new adapter's weights start"),
        ("hidden-dim", "--init-adapter {ours}: --hidden-dim 32 against its 16. The loaded adapter's weights fix"),
        ("max-objs", "--init-adapter {ours}: --max-objs 30 against its 4. The loaded adapter's weights fix"),
        ("layers", "--init-adapter {ours}: --layers all (7 blocks) against its 1 blocks (only in --layers: "
                   "['down_blocks.0.attentions.0.transformer_blocks.0', "
                   "'down_blocks.1.attentions.0.transformer_blocks.0']; only in the adapter: [])"),
        ("not-an-adapter", "--init-adapter {root}/sd: {root}/sd holds no spatial adapter: expected our "
                           "save_pretrained folder"),
        ("subfolder-alone", "--init-adapter-subfolder needs --init-adapter SOURCE"),
        ("base-unet-ours", "--init-adapter-base-unet with --init-adapter {ours}: that folder holds only an "
                           "adapter (our save_pretrained format), no base UNet"),
        ("gated-on-sd", "--init-adapter {root}/gligen-xl (--init-adapter-subfolder unet): its grounding tokens are "
                        "64 wide, --pretrained-model {root}/sd's UNet cross-attends over 32"),
    ],
)  # fmt: skip
def test_init_adapter_refusals_come_before_the_pipeline_loads(
    toy, our_run, tmp_path, monkeypatch, case, message
):
    ours = ["--init-adapter", str(our_run / "adapter")]
    extra = {
        "missing": ["--init-adapter", str(toy["root"] / "nowhere")],
        "subfolder": ["--init-adapter", str(toy["gligen_xl"]), "--init-adapter-subfolder", "transformer"],
        "init-mode": [*ours, "--init-mode", "zero_out"],
        "gate-init": [*ours, "--gate-init-value", "0.5"],
        "hidden-dim": [*ours, "--hidden-dim", "32"],
        "max-objs": [*ours, "--max-objs=30"],  # the default's value, given: it must match too
        "layers": [*ours, "--layers", "all"],
        "not-an-adapter": ["--init-adapter", str(toy["sd"])],  # the base model's folder by mistake
        "subfolder-alone": ["--init-adapter-subfolder", "unet"],
        "base-unet-ours": [*ours, "--init-adapter-base-unet"],
        "gated-on-sd": _gligen_xl(toy),
    }[case]
    _no_pipeline_load(monkeypatch)
    with pytest.raises(SystemExit) as error:
        train_fresh(_argv(toy, tmp_path / "out", *extra, model="sd"))
    assert message.format(root=toy["root"], ours=our_run / "adapter") in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_passes_the_early_check_and_a_local_typo_does_not(toy, tmp_path):
    assert init_module.looks_like_hub_id("jiuntian/gligen-xl-1024")
    assert not init_module.looks_like_hub_id("runs/a/adapter") and not init_module.looks_like_hub_id("x.pth")
    args = parse_args(_argv(toy, "out", "--init-adapter", "jiuntian/gligen-xl-1024", "--init-adapter-subfolder",
                            "unet"))  # fmt: skip
    assert init_module.check_before_loading(args, set()) is None  # only loading it can tell its shape


def test_an_official_gligen_checkpoint_file_trains_and_is_checked_once_loaded(toy, tmp_path, monkeypatch):
    """A GLIGEN .pth (LDM naming, the whole UNet): only loading it tells its shape, so a differing --max-objs
    is refused after it loads; without one it trains from the checkpoint's fusers."""
    from diffusers_ext.gligen_conversion import save_gligen_checkpoint

    unet = DiffusionPipeline.from_pretrained(toy["sd"]).unet
    torch.manual_seed(5)
    adapter = SpatialAdapter.for_unet(unet, 32, hidden_dim=16, phrase_norm=False, gate_init=0.5)
    path = save_gligen_checkpoint(adapter, unet, tmp_path / "gligen.pth")
    with pytest.raises(SystemExit) as error:
        train_fresh(
            _argv(toy, tmp_path / "refused", "--init-adapter", str(path), "--max-objs", "4", model="sd")
        )
    assert f"--init-adapter {path}: --max-objs 4 against its 30" in str(error.value)
    seen = _spy_on_build(monkeypatch)
    result = train_fresh(
        _argv(toy, tmp_path / "out", "--init-adapter", str(path), "--max-train-steps", "1", model="sd")
    )
    assert result["steps"] == 1
    expected = {k: v.float() for k, v in adapter_to_gated_state_dict(adapter).items()}
    assert set(seen["gated"]) == set(expected)
    assert all(torch.equal(seen["gated"][k], v) for k, v in expected.items())


def _hub_cache(tmp_path, monkeypatch, folder, repo="tester/gligen-xl-tiny"):
    """``folder`` as a hub repo downloaded before: the hub cache's layout (refs/main -> snapshots/<commit>)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo


def test_a_hub_id_in_the_hub_cache_is_checked_before_loading_and_trains_offline(toy, tmp_path, monkeypatch):
    repo = _hub_cache(tmp_path, monkeypatch, toy["gligen_xl"])
    hub = ["--init-adapter", repo, "--init-adapter-subfolder", "unet"]
    with monkeypatch.context() as m:
        _no_pipeline_load(m)
        with pytest.raises(SystemExit) as error:
            train_fresh(_argv(toy, tmp_path / "out", *hub, "--layers", "mid"))
    assert (
        f"--init-adapter {repo} (--init-adapter-subfolder unet): --layers mid (1 blocks) against its 7 blocks"
        in str(error.value)
    )
    seen = _spy_on_build(monkeypatch)
    result = train_fresh(_argv(toy, tmp_path / "out", *hub, "--max-train-steps", "1"))
    assert result["steps"] == 1
    assert torch.equal(seen["gated"][FUSER], toy["gated"].state_dict()[FUSER])


def test_a_phrase_width_that_does_not_fit_is_refused_after_loading_and_before_overwrite_deletes(
    toy, gligen_xl_run, tmp_path
):
    """Our adapter built for the SDXL UNet's blocks and token width but 48-wide phrase features (the pipeline's
    are 64): only the loaded adapter and the text encoders can tell, so it is refused once they are loaded,
    still before --overwrite deletes the used output folder."""
    unet = DiffusionPipeline.from_pretrained(toy["sdxl"]).unet
    SpatialAdapter.for_unet(unet, 48, hidden_dim=16).save_pretrained(tmp_path / "narrow")
    out = tmp_path / "used"
    shutil.copytree(gligen_xl_run[0], out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as error:
        train_fresh(_argv(toy, out, "--init-adapter", str(tmp_path / "narrow"), "--overwrite"))
    assert (
        f"--init-adapter {tmp_path / 'narrow'}: its grounding tokenizer takes 48-wide phrase features, "
        f"--pretrained-model {toy['sdxl']}'s text encoders give 64" in str(error.value)
    )
    assert sorted(p.name for p in out.iterdir()) == before


def test_freeze_gate_keeps_loaded_gates_and_refuses_gates_that_are_all_zero(toy, our_run, tmp_path):
    result = train_fresh(_argv(toy, tmp_path / "frozen", "--init-adapter", str(our_run / "adapter"), "--freeze-gate",
                          "--max-train-steps", "1", model="sd"))  # fmt: skip
    assert result["trainable"] and not any("alpha_" in n for n in result["trainable"])
    unet = DiffusionPipeline.from_pretrained(toy["sd"]).unet
    SpatialAdapter.for_unet(unet, 32, layers="mid", hidden_dim=16).save_pretrained(
        tmp_path / "fresh"
    )  # gates 0
    with pytest.raises(SystemExit) as error:
        train_fresh(
            _argv(
                toy, tmp_path / "out", "--init-adapter", str(tmp_path / "fresh"), "--freeze-gate", model="sd"
            )
        )
    assert (
        f"--freeze-gate with --init-adapter {tmp_path / 'fresh'}: every loaded gate is 0, and a frozen zero gate "
        "never opens" in str(error.value)
    )


def test_an_unreachable_hub_id_is_named_with_the_flag(toy, tmp_path):
    with pytest.raises(SystemExit) as error:
        train_fresh(_argv(toy, tmp_path / "out", "--init-adapter", "nobody/no-such-adapter", model="sd"))
    assert str(error.value).startswith(
        "--init-adapter nobody/no-such-adapter: 'nobody/no-such-adapter' is neither a local file or folder nor "
        "reachable on the Hugging Face hub"
    )
    assert not (tmp_path / "out").exists()


# ---- resume -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["ours", "none"])
def test_resume_with_another_init_adapter_is_refused_naming_both(toy, gligen_xl_run, our_run, tmp_path,
                                                                 monkeypatch, other):  # fmt: skip
    ckpt = gligen_xl_run[0] / "checkpoint-1"
    extra = ["--init-adapter", str(our_run / "adapter")] if other == "ours" else []
    _no_pipeline_load(monkeypatch)
    with pytest.raises(SystemExit) as error:
        train_fresh(_argv(toy, tmp_path / "out", *extra, "--resume", str(ckpt), "--lora-rank", "2", "--ema",
                     "--max-train-steps", "2"))  # fmt: skip
    now = repr(str((our_run / "adapter").resolve())) if other == "ours" else "None"
    assert f"--init-adapter {str(toy['gligen_xl'].resolve())!r} in the checkpoint, {now} now" in str(
        error.value
    )
    assert "cannot change in a resumed run" in str(error.value)


def test_a_resume_with_the_same_init_adapter_keeps_the_checkpoint_s_weights(
    toy, gligen_xl_run, tmp_path, monkeypatch
):
    """The checkpoint's weights win, and the init's are not even read (GLIGEN-XL's gated UNet is 4.4 B
    parameters to read only to be overwritten)."""
    import diffusers_ext.loaders

    ckpt = gligen_xl_run[0] / "checkpoint-1"
    saved = load_file(str(ckpt / "trainable.safetensors"))
    out = tmp_path / "resumed"
    # reading the init weights would be a TypeError
    monkeypatch.setattr(diffusers_ext.loaders, "load_spatial_adapter", None)
    # resumed at step 1 with --max-train-steps 1: no step is taken, so the exported adapter is what was loaded
    result = train_fresh(_argv(toy, out, *_gligen_xl(toy), "--resume", str(ckpt), "--lora-rank", "2", "--ema",
                          "--max-train-steps", "1"))  # fmt: skip
    assert result["steps"] == 1 and result["losses"] == []
    exported = load_file(str(out / "adapter" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, saved[f"adapter.{k}"]) for k, v in exported.items())
    init = gligen_xl_run[1]["adapter"]
    assert not all(torch.equal(v, init[k]) for k, v in exported.items())  # not the init weights again
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]
    exported_ema = list(SpatialAdapter.from_pretrained(out / "adapter_ema").parameters())
    assert len(ema) == len(exported_ema)
    # the EMA is the checkpoint's too, not one started from the init (or from the stand-in's zeros)
    assert all(torch.equal(p.detach(), e) for p, e in zip(exported_ema, ema, strict=True))


def test_a_run_resumed_from_its_init_adapter_checkpoint_continues_like_the_uninterrupted_one(
    toy, gligen_xl_run, tmp_path
):
    out, _, uninterrupted = gligen_xl_run
    result = train_fresh(_argv(toy, tmp_path / "resumed", *_gligen_xl(toy), "--resume", str(out / "checkpoint-1"),
                          "--lora-rank", "2", "--ema", "--max-train-steps", "2"))  # fmt: skip
    assert result["losses"] == uninterrupted["losses"][1:]
    name = "diffusion_pytorch_model.safetensors"
    for folder in ("adapter", "adapter_ema"):
        resumed = load_file(str(tmp_path / "resumed" / folder / name))
        reference = load_file(str(out / folder / name))
        assert all(torch.equal(v, reference[k]) for k, v in resumed.items()), folder


@pytest.mark.slow
def test_two_processes_start_from_the_init_adapter_and_take_the_single_process_step(toy, our_run, tmp_path):
    """Under ``accelerate launch`` with 2 CPU processes each rank loads the init adapter, and the step is the
    one a single process takes on the same global batch (2 x 1 against 1 x 2 samples)."""
    from test_diffusers_train_distributed import _launch, _losses

    init = ["--init-adapter", str(our_run / "adapter"), "--max-train-steps", "1"]
    single = tmp_path / "single"
    train_fresh(_argv(toy, single, *init, model="sd"))
    two = tmp_path / "two"
    # the last --batch-size wins: 2 processes x 1 sample, the single run's global batch of 2
    _launch([*_argv(toy, two, *init, model="sd"), "--batch-size", "1"], port=29561)
    assert _losses(two)[1] == pytest.approx(_losses(single)[1], rel=1e-5)
    again = load_spatial_adapter(DiffusionPipeline.from_pretrained(toy["sd"]), two / "adapter")
    assert again.layer_names == ["mid_block.attentions.0.transformer_blocks.0"]
