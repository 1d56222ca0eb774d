"""build_optimizer: each optimizer trains the toy adapter, resumes bit-exactly, and holds the bytes it claims."""

import io

import pytest
import torch

from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_unet import tiny_unet
from diffusers_ext.training.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    bytes_per_parameter,
    optimizer_state_bytes,
    stochastic_round_to_bf16,
)

torch.set_num_threads(1)
PHRASE_DIM = 16
LEVERS = [(name, sr) for name in OPTIMIZERS for sr in (False, True)]


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step % 4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.4, 0.2, 0.9, 0.8]]]).expand(2, -1, -1)
    phrases = torch.randn(2, 2, PHRASE_DIM, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    return x, text, boxes, phrases, target


def _toy(name, sr, init_seed=0):
    torch.manual_seed(0)
    unet = tiny_unet().eval().requires_grad_(False)
    torch.manual_seed(init_seed)
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=PHRASE_DIM, hidden_dim=64, max_objs=4)
    if sr:
        adapter.to(torch.bfloat16)
    adapter.install(unet)
    opt = build_optimizer(adapter.parameters(), name=name, lr=3e-3, bf16_stochastic_rounding=sr, seed=7)
    return unet, adapter, opt


def _step(unet, adapter, opt, step: int) -> float:
    x, text, boxes, phrases, target = _batch(step)
    # the GPU path: bf16 autocast around the forward, the loss in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cka = adapter.cross_attention_kwargs(boxes, phrases)
        out = unet(x, torch.tensor([500, 500]), text, cross_attention_kwargs=cka).sample
    loss = (out.float() - target).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name, sr", LEVERS)
def test_each_optimizer_trains_the_toy_adapter(name, sr):
    unet, adapter, opt = _toy(name, sr)
    losses = [_step(unet, adapter, opt, i) for i in range(24)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.97 * first, (first, last)
    assert adapter.gate_stats()["abs_mean"] > 0.01  # the gates opened from 0
    assert all(p.dtype == (torch.bfloat16 if sr else torch.float32) for p in adapter.parameters())
    if name == "adamw8bit":
        dtypes = {v.dtype for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
        assert torch.uint8 in dtypes  # the fusers' large weights really hold 8-bit moments


@pytest.mark.parametrize("name, sr", LEVERS)
def test_a_resumed_run_takes_the_bit_equal_next_step(name, sr):
    unet, adapter, opt = _toy(name, sr)
    for i in range(3):
        _step(unet, adapter, opt, i)
    buffer = io.BytesIO()
    torch.save({"adapter": adapter.state_dict(), "optimizer": opt.state_dict()}, buffer)
    _step(unet, adapter, opt, 3)
    continued = {k: v.clone() for k, v in adapter.state_dict().items()}

    adapter.remove()
    unet2, adapter2, opt2 = _toy(name, sr, init_seed=1)  # another init: everything must come from the file
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    adapter2.load_state_dict(saved["adapter"])
    opt2.load_state_dict(saved["optimizer"])
    _step(unet2, adapter2, opt2, 3)
    resumed = adapter2.state_dict()
    differing = [k for k in continued if not torch.equal(continued[k], resumed[k])]
    assert differing == []
    moved = [k for k in continued if not torch.equal(continued[k], saved["adapter"][k])]
    assert moved  # the step did change weights, so equality above is not vacuous


@pytest.mark.parametrize("name, sr", LEVERS)
def test_bytes_of_state_per_parameter_are_what_is_claimed(name, sr):
    n = 1 << 18
    weight = torch.nn.Parameter(torch.randn(512, n // 512, dtype=torch.bfloat16 if sr else torch.float32))
    opt = build_optimizer([weight], name=name, lr=1e-3, bf16_stochastic_rounding=sr)
    weight.grad = torch.randn_like(weight)
    opt.step()
    claim = bytes_per_parameter(name, bf16_stochastic_rounding=sr)
    assert optimizer_state_bytes(opt) / n == pytest.approx(claim["optimizer_state"], rel=0.01)
    assert weight.element_size() == claim["weights"] and weight.grad.element_size() == claim["gradients"]


def test_the_claims_in_numbers():
    assert bytes_per_parameter("adamw")["total"] == 16.0
    assert bytes_per_parameter("adamw8bit")["total"] == pytest.approx(10.03125)
    assert bytes_per_parameter("adamw8bit", bf16_stochastic_rounding=True)["total"] == pytest.approx(6.03125)


def test_stochastic_rounding_is_unbiased_and_nearest_rounding_is_not():
    x = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of the way from 1 to the next bf16 value 1 + 2^-7
    g = torch.Generator().manual_seed(0)
    rounded = stochastic_round_to_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert (rounded > 1).float().mean().item() == pytest.approx(0.125, abs=0.003)
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]
    negative = stochastic_round_to_bf16(-x, g).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)
    assert stochastic_round_to_bf16(torch.tensor([float("inf"), 2.0]), g).tolist() == [float("inf"), 2.0]


def test_bf16_weights_keep_updates_smaller_than_half_an_ulp():
    """AdamW's step is about lr per step; at lr 1e-4 on weights of 1.0 it is below half a bf16 ulp (2^-8),
    so round-to-nearest would keep the weights at exactly 1.0 forever. Stochastic rounding moves them by
    lr per step in expectation."""
    weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = build_optimizer([weight], name="adamw", lr=1e-4, bf16_stochastic_rounding=True)
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        opt.step()
    assert weight.float().mean().item() == pytest.approx(1.0 - 100 * 1e-4, abs=1e-3)
    nearest = torch.ones(8192, dtype=torch.bfloat16)
    for _ in range(100):
        nearest = (nearest.float() - 1e-4).to(torch.bfloat16)
    assert nearest.float().mean().item() == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "sgd"}, "unknown optimizer 'sgd'; accepted: adamw, adamw8bit"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        ({"bf16_stochastic_rounding": True}, "needs bf16 parameters, parameter 0 of group 0 (shape (4, 4))"),
    ],
)
def test_bad_settings_are_refused_before_any_state(kwargs, message):
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError) as err:
        build_optimizer(layer.parameters(), **{"lr": 1e-3, **kwargs})
    assert message in str(err.value)


def test_half_precision_weights_without_stochastic_rounding_are_refused():
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"torch.bfloat16: updating half-precision weights .*\(--bf16-adapter\)"
    ):
        build_optimizer(layer.parameters(), lr=1e-3)


def _stepped(name, sr):
    weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16 if sr else torch.float32))
    opt = build_optimizer([weight], name=name, lr=1e-3, bf16_stochastic_rounding=sr)
    weight.grad = torch.ones_like(weight)
    opt.step()
    return opt


@pytest.mark.parametrize("saved", LEVERS)
@pytest.mark.parametrize("resumed", LEVERS)
def test_a_resume_that_changes_the_optimizer_lever_is_refused(saved, resumed):
    state = _stepped(*saved).state_dict()
    target = _stepped(*resumed)
    if saved == resumed:
        target.load_state_dict(state)
        return
    with pytest.raises(ValueError) as err:
        target.load_state_dict(state)
    assert str(err.value) == (
        f"the optimizer state was saved by optimizer {saved[0]!r} with bf16_stochastic_rounding={saved[1]}, "
        f"this run uses optimizer {resumed[0]!r} with bf16_stochastic_rounding={resumed[1]}; resume with the "
        "optimizer flags it was saved with (--use-8bit-adam, --bf16-adapter)"
    )


def test_an_untagged_state_without_a_rounding_generator_is_refused():
    state = _stepped("adamw8bit", False).state_dict()
    del state["lever"]  # as saved before the tag existed
    with pytest.raises(ValueError, match="saved without bf16_stochastic_rounding"):
        _stepped("adamw8bit", True).load_state_dict(state)


def test_the_docstring_examples_run():
    import doctest

    import diffusers_ext.training.optimizers as module

    result = doctest.testmod(module)
    assert result.attempted >= 2 and result.failed == 0


def test_the_rounding_state_is_kept_per_device_type_so_every_rank_resumes_it():
    """Rank 0 saves from cuda:0, rank 1 resumes on cuda:1: a key with the device index would leave rank 1
    with a fresh generator, and the ranks' bf16 weights would drift apart."""
    weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = build_optimizer([weight], name="adamw8bit", lr=1e-4, bf16_stochastic_rounding=True, seed=3)
    weight.grad = torch.ones_like(weight)
    opt.step()
    saved = opt.state_dict()
    assert list(saved["bf16_stochastic_rounding"]["generators"]) == ["cpu"]
    other = torch.nn.Parameter(weight.detach().clone())
    resumed = build_optimizer([other], name="adamw8bit", lr=1e-4, bf16_stochastic_rounding=True, seed=99)
    resumed.load_state_dict(saved)
    assert (
        resumed._generator(torch.device("cpu", 1))
        .get_state()
        .equal(opt._generator(weight.device).get_state())
    )


@pytest.mark.parametrize("name, sr", LEVERS)
def test_every_optimizer_steps_on_the_meta_device_with_its_state_there(name, sr):
    """The memory rehearsal runs the trainer's optimizer step on the meta device."""
    weight = torch.nn.Parameter(
        torch.ones(8192, device="meta", dtype=torch.bfloat16 if sr else torch.float32)
    )
    opt = build_optimizer([weight], name=name, lr=1e-3, bf16_stochastic_rounding=sr)
    weight.grad = torch.ones_like(weight)
    opt.step()
    state = [v for v in opt.state[weight].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    assert state and all(v.device.type == "meta" for v in state)
    assert weight.dtype == (torch.bfloat16 if sr else torch.float32)


def test_importing_bitsandbytes_drops_only_its_4bit_kernel_notice(caplog):
    """bitsandbytes' CPU backend warns that the optional 4-bit GEMM kernel is missing; nothing here uses
    4-bit weights, so only that notice is dropped and its other warnings still show."""
    import logging

    from diffusers_ext.training.optimizers import import_bitsandbytes

    import_bitsandbytes()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'"
        )
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
