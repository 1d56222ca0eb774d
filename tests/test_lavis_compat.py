"""lavis_ext.compat: the unmodified salesforce-lavis 1.0.2 works on transformers 5 / timm 1."""

import argparse
import multiprocessing
import os
import socket

import pytest
import torch

import lavis_ext  # noqa: F401  (applies the shims)
from lavis_ext import compat


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_qformer_config(**overrides):
    from lavis.models.blip2_models.Qformer import BertConfig

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config.encoder_width = 24
    config.add_cross_attention = True
    config.cross_attention_freq = 2
    config.query_length = 4
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def write_vocab(folder, words=("make", "the", "red", "circle", "blue", "a", "##s")):
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return tokens


def test_import_lavis_and_registry_work():
    import lavis
    from lavis.common.registry import registry

    assert lavis.__version__ == "1.0.2" if hasattr(lavis, "__version__") else True
    assert registry.get_model_class("blip2") is not None
    assert registry.get_runner_class("runner_base") is not None
    assert registry.get_task_class("retrieval") is not None


def test_apply_is_idempotent():
    from transformers import PreTrainedModel

    init_weights = PreTrainedModel.init_weights
    compat.apply()
    compat.apply()
    assert compat.applied()
    assert PreTrainedModel.init_weights is init_weights
    assert len(compat.SHIMS) >= 6
    assert all(description for description in compat.SHIMS.values())


def test_modeling_utils_reexports_moved_helpers():
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    assert modeling_utils.apply_chunking_to_forward is pytorch_utils.apply_chunking_to_forward
    assert modeling_utils.prune_linear_layer is pytorch_utils.prune_linear_layer


def test_find_pruneable_heads_and_indices_keeps_the_other_heads():
    heads, index = compat.find_pruneable_heads_and_indices(
        [1, 3], n_heads=4, head_size=2, already_pruned_heads={0}
    )
    # head 0 was pruned before, so the current layout is heads 1,2,3 (6 dims); removing 1 and 3 keeps head 2.
    assert heads == {1, 3}
    assert index.tolist()[:2] == [2, 3]
    assert len(index) == 8 - 2 * 2


def test_model_parallel_utils_is_importable():
    from transformers.utils.model_parallel_utils import assert_device_map, get_device_map

    device_map = get_device_map(5, ["cpu:0", "cpu:1"])
    assert device_map == {"cpu:0": [0, 1, 2], "cpu:1": [3, 4]}
    assert_device_map(device_map, 5)
    with pytest.raises(ValueError, match="missing \\[4\\]"):
        assert_device_map({"cpu:0": [0, 1, 2, 3]}, 5)


def test_invert_attention_mask_makes_masked_keys_very_negative():
    from lavis.models.blip2_models.Qformer import BertModel

    model = BertModel(tiny_qformer_config(), add_pooling_layer=False)
    mask = torch.tensor([[1, 1, 0]])
    inverted = model.invert_attention_mask(mask)
    assert inverted.shape == (1, 1, 1, 3)
    assert inverted[0, 0, 0, :2].tolist() == [0.0, 0.0]
    assert inverted[0, 0, 0, 2].item() == torch.finfo(torch.float32).min
    assert model.get_head_mask(None, 2) == [None, None]


@pytest.mark.parametrize("mode", ["image_text", "text_only", "query_only"])
def test_lavis_qformer_runs_forward_and_backward(mode):
    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    torch.manual_seed(0)
    model = BertLMHeadModel(config=tiny_qformer_config())
    batch, n_query, n_text = 2, 4, 6
    queries = torch.randn(batch, n_query, 32, requires_grad=True)
    image = torch.randn(batch, 5, 24)
    image_mask = torch.ones(batch, 5, dtype=torch.long)
    text = torch.randint(6, 64, (batch, n_text))
    text_mask = torch.ones(batch, n_text, dtype=torch.long)
    text_mask[1, -2:] = 0
    if mode == "image_text":
        out = model.bert(
            text,
            query_embeds=queries,
            attention_mask=torch.cat([torch.ones(batch, n_query, dtype=torch.long), text_mask], 1),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        expected = (batch, n_query + n_text, 32)
    elif mode == "text_only":
        out = model.bert(text, attention_mask=text_mask, return_dict=True)
        expected = (batch, n_text, 32)
    else:
        out = model.bert(
            query_embeds=queries,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        expected = (batch, n_query, 32)
    hidden = out.last_hidden_state
    assert hidden.shape == expected
    assert torch.isfinite(hidden).all()
    hidden.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if mode != "text_only":
        assert queries.grad.abs().sum() > 0
    # the cross-attention weights only receive gradient when an image is attended
    crossattn_grad = model.bert.encoder.layer[0].crossattention.self.query.weight.grad
    assert (crossattn_grad is not None and crossattn_grad.abs().sum() > 0) == (mode != "text_only")


def test_lavis_qformer_language_model_loss():
    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    torch.manual_seed(0)
    model = BertLMHeadModel(config=tiny_qformer_config())
    text = torch.randint(6, 64, (2, 6))
    out = model(text, attention_mask=torch.ones_like(text), labels=text, return_dict=True)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.cls.predictions.decoder.weight.grad.abs().sum() > 0


def test_lavis_eva_vit_builds_tiny_and_runs():
    from lavis.models.eva_vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        use_mean_pooling=False,
        norm_layer=torch.nn.LayerNorm,
    )
    images = torch.randn(2, 3, 32, 32)
    tokens = vit(images) if False else vit.forward_features(images)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 48)
    assert vit.num_features == 48
    tokens.mean().backward()
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_blip2_tokenizer_works_offline_from_a_local_vocab(tmp_path, monkeypatch):
    from lavis.models.blip2_models.blip2 import Blip2Base

    tokens = write_vocab(tmp_path)
    monkeypatch.setenv(compat.BERT_BASE_ENV, str(tmp_path))
    tokenizer = Blip2Base.init_tokenizer()
    assert tokenizer.bos_token == "[DEC]"
    assert tokenizer.bos_token_id == len(tokens)  # added after the vocab
    ids = tokenizer("Make the red circles", return_tensors="pt").input_ids[0].tolist()
    expected = [tokens.index(t) for t in ("[CLS]", "make", "the", "red", "circle", "##s", "[SEP]")]
    assert ids == expected


def test_blip2_qformer_loads_from_a_local_folder(tmp_path, monkeypatch):
    from lavis.models.blip2_models.blip2 import Blip2Base
    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    torch.manual_seed(0)
    config = tiny_qformer_config()
    source = BertLMHeadModel(config=config)
    source.save_pretrained(tmp_path)
    write_vocab(tmp_path)
    monkeypatch.setenv(compat.BERT_BASE_ENV, str(tmp_path))
    qformer, query_tokens = Blip2Base.init_Qformer(num_query_token=4, vision_width=24, cross_attention_freq=2)
    assert query_tokens.shape == (1, 4, 32)
    loaded = dict(qformer.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), name


def _distributed_rank(env, result):
    """Rank 0 of a one-rank torchrun job: LAVIS's own init, DDP wrapper and metric sync; the outcome (or the
    traceback) goes to ``result``."""
    import traceback

    try:
        os.environ.update(env)
        import lavis.common.dist_utils as dist_utils
        import lavis.runners.runner_base as runner_base
        from lavis.common.logger import SmoothedValue

        args = argparse.Namespace(dist_url="env://")
        dist_utils.init_distributed_mode(args)
        assert args.distributed and args.dist_backend == "gloo", args
        wrapped = runner_base.DDP(torch.nn.Linear(3, 2), device_ids=[0])
        wrapped(torch.randn(4, 3)).sum().backward()
        meter = SmoothedValue()
        meter.update(2.0, n=3)
        meter.synchronize_between_processes()
        result.write_text(f"OK {meter.count} {meter.global_avg}")
    except BaseException:
        result.write_text(traceback.format_exc())
        raise


def test_cpu_distributed_runs_under_lavis(tmp_path):
    """LAVIS's distributed init, DDP wrapping and metric sync work on CPU with gloo (one-rank group).

    The rank is a forked process: it has its own process group and ``print`` (LAVIS's init replaces it), and
    inherits the imported, shimmed LAVIS instead of importing it again for 20 s."""
    env = dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="",
    )
    # a one-process group left by an earlier in-process run would be inherited by the forked rank
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    result = tmp_path / "result.txt"
    rank = multiprocessing.get_context("fork").Process(target=_distributed_rank, args=(env, result))
    rank.start()
    rank.join(timeout=300)
    if rank.is_alive():
        rank.kill()
    outcome = result.read_text() if result.exists() else "(no result written)"
    assert rank.exitcode == 0, outcome[-3000:]
    assert outcome == "OK 3 2.0"


def test_lavis_processors_build_from_config():
    import numpy as np
    from lavis.common.registry import registry
    from omegaconf import OmegaConf
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((50, 60, 3)) * 255).astype("uint8"))
    for name in ("blip_image_train", "blip_image_eval", "blip2_image_train"):
        processor = registry.get_processor_class(name).from_config(OmegaConf.create({"image_size": 32}))
        assert processor(image).shape == (3, 32, 32), name
    caption = registry.get_processor_class("blip_caption").from_config(OmegaConf.create({"max_words": 4}))
    assert caption("Make the RED circle, blue!") == "make the red circle,"


def test_options_model_type_chooses_that_types_default_yaml():
    """`--options model.model_type=tiny` on a project file that says `pretrain` builds the tiny defaults
    (LAVIS 1.0.2 looked the option up under a flat key that never exists and silently kept `pretrain`)."""
    from pathlib import Path

    from lavis.common.config import Config
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parent.parent
    project = OmegaConf.load(root / "lavis_ext" / "projects" / "cirr_sprc.yaml")
    assert project.model.model_type == "pretrain"
    tiny = OmegaConf.load(root / "lavis_ext" / "configs" / "models" / "blip2_cir_align_prompt_tiny.yaml")
    pretrain = OmegaConf.load(
        root / "lavis_ext" / "configs" / "models" / "blip2_cir_align_prompt_pretrain.yaml"
    )
    options = OmegaConf.from_dotlist(["model.model_type=tiny"])
    built = Config.build_model_config(project, **options).model
    differing = [k for k in tiny.model if k in pretrain.model and tiny.model[k] != pretrain.model[k]]
    assert differing, "the tiny and pretrain defaults should differ somewhere"
    for key in differing:
        if key not in project.model:
            assert built[key] == tiny.model[key], key
    assert Config.build_model_config(project).model.get("vit_model") == pretrain.model.get("vit_model")
