"""lavis_ext's training step under the reduced precisions its users pick (bf16 and fp16 autocast on CPU),
and no count or index passing through a reduced dtype (issue 29: bf16 holds no odd integer above 256)."""

import pytest
import torch
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (registers the model)
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt
from lavis_ext.models.gated_fusion import GatedFusion

CAPTIONS = ["make the red circle larger", "remove the green star", "add a yellow triangle"]


def test_the_caption_mean_counts_and_sums_in_fp32_for_bf16_tokens():
    """257 caption tokens: bf16 rounds the count to 256 (a 0.4 % larger mean) and the result to 8 bits."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 300, 8, generator=g).to(torch.bfloat16)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :257] = 1
    mask[1, :3] = 1
    mean = GatedFusion.masked_mean(tokens, mask)
    exact = (tokens.double() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), exact, rtol=1e-6, atol=1e-7)


def _model(fusion):
    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    cfg.use_gated_fusion = fusion
    torch.manual_seed(0)
    model = Blip2QformerCirAlignPrompt.from_config(cfg).eval()
    if fusion:
        with torch.no_grad():
            model.gated_fusion.alpha.fill_(0.5)
    return model


def _step(model, dtype):
    g = torch.Generator().manual_seed(1)
    samples = {
        "image": torch.randn(3, 3, 32, 32, generator=g),
        "target": torch.randn(3, 3, 32, 32, generator=g),
        "text_input": CAPTIONS,
    }
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(samples)
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", [False, True], ids=["sprc", "gated_fusion"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_training_step_under_autocast_matches_fp32(dtype, fusion):
    model = _model(fusion)
    reference, reference_grads = _step(model, None)
    out, grads = _step(model, dtype)
    for key in ("loss", "loss_itc", "loss_rtc", "loss_align"):
        assert out[key].dtype == torch.float32, key  # losses are reduced in fp32 (cross_entropy, mse)
        assert torch.isfinite(out[key])
        assert out[key].item() == pytest.approx(reference[key].item(), rel=0.05, abs=1e-3), key
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
    # the direction of the whole update is kept (8 mantissa bits in bf16)
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ref = torch.cat([reference_grads[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99


def test_ranks_and_labels_stay_int64_under_autocast():
    """Similarity under autocast is reduced; the ranks computed from it, the labels and the reference's
    position are int64, so a 100k gallery index is never rounded."""
    from lavis_ext.tasks.recall import target_ranks

    model = _model(False)
    feats = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(300, 8, 32), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = model.similarity(feats, gallery)
        target = torch.tensor([257, 259, 261, 299, 1])  # odd, above 256: not representable in bf16
        ranks = target_ranks(sim, target)
        _, labels = model._negatives(gallery[:5])
    assert ranks.dtype == torch.int64 and labels.dtype == torch.int64
    assert [
        int(sim[q].float().gt(sim[q, t].float()).sum()) for q, t in enumerate(target.tolist())
    ] == ranks.tolist()
