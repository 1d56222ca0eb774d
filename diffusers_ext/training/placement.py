"""Where every component of a spatial-adapter training run lives, and in which dtype: one rule, applied once.

The trainer used to move modules at several places, and each configuration the suite did not run broke on
the first GPU step: with ``--cache-dir`` but not ``--cache-latents`` the VAE was never moved to the device
(pixels on the GPU, VAE on the CPU), the VAE encoded in fp16 and overflowed to NaN latents (SDXL's and
Kolors' VAE carry ``force_upcast``; diffusers' SDXL training scripts keep it in fp32 for this reason), and the
cache pass ran with the UNet already on the device beside the text encoders. Here the decision is data
(:class:`Placement` and its :meth:`Placement.table`) and two functions apply it:

- :func:`place_for_training` puts every component the steps use where the table says (the UNet and text
  encoders in the weight dtype, the VAE in ``vae_dtype``, the adapter, LoRA parameters and EMA in fp32) and
  checks every parameter and buffer, naming the component on a mismatch;
- :func:`encoders_on_device` is the cache pass's context manager: it moves only the encoders it is given
  to the device and moves them back off when it leaves, so the UNet and the other encoder are never on the
  device together with them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "Placement",
    "check_placement",
    "encoders_on_device",
    "place_for_training",
    "plan_placement",
    "training_components",
]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """The device and dtypes of one run.

    ``weight_dtype``: the frozen UNet and text encoders (autocast computes in it); ``vae_dtype``: the VAE
    (fp32 under fp16 for a ``force_upcast`` VAE, else the weight dtype); ``trainable_dtype``: the adapter
    and the LoRA parameters (fp32 master weights, as accelerate's mixed precision expects; bf16 with
    ``--bf16-adapter``, whose optimizer rounds stochastically); ``ema_dtype``: the EMA copy (fp32: an
    average with decay 0.9999 moves by less than bf16 can hold).
    ``cache_text``/``cache_latents``: the text encoders / the VAE are used only by the cache pass and are
    freed before training, so they have no place during training."""

    device: torch.device
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    trainable_dtype: torch.dtype = torch.float32
    ema_dtype: torch.dtype = torch.float32
    cache_text: bool = False
    cache_latents: bool = False

    def table(self, components=None) -> dict[str, tuple[torch.device, torch.dtype]]:
        """``{component: (device, dtype)}`` for the training steps; a cached encoder has no entry.

        ``components`` (optional) limits the table to the names given (e.g. a pipeline without
        ``text_encoder_2``)."""
        out = {"unet": (self.device, self.weight_dtype)}
        if not self.cache_latents:
            out["vae"] = (self.device, self.vae_dtype)
        if not self.cache_text:
            for name in TEXT_ENCODERS:
                out[name] = (self.device, self.weight_dtype)
        for name in ("adapter", "lora"):
            out[name] = (self.device, self.trainable_dtype)
        out["ema"] = (self.device, self.ema_dtype)
        if components is not None:
            out = {k: v for k, v in out.items() if k in set(components)}
        return out

    def cache_pass_table(self) -> dict[str, tuple[torch.device, torch.dtype]]:
        """Where each encoder goes while the cache pass uses it (one at a time, see :func:`encoders_on_device`)."""
        return {
            "vae": (self.device, self.vae_dtype),
            **{name: (self.device, self.weight_dtype) for name in TEXT_ENCODERS},
        }


def plan_placement(
    mixed_precision: str,
    device,
    *,
    cache_dir: bool,
    cache_latents: bool,
    vae_force_upcast: bool = True,
    bf16_adapter: bool = False,
) -> Placement:
    """The placement for ``--mixed-precision`` on ``device``.

    Args:
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate's names).
        device: the training device (``accelerator.device``; ``"meta"`` for a rehearsal).
        cache_dir: whether ``--cache-dir`` is given (the text encoders then serve only the cache pass).
        cache_latents: whether the VAE latents are cached too (the VAE then serves only the cache pass).
        vae_force_upcast: the VAE config's ``force_upcast`` (True for SD, SDXL and Kolors VAEs): under fp16
            such a VAE encodes in fp32, as diffusers' SDXL scripts and pipelines do.
        bf16_adapter: ``--bf16-adapter``: the adapter and LoRA weights in bf16 (with bf16 mixed precision).
    """
    if mixed_precision not in _DTYPES:
        raise ValueError(f"mixed_precision {mixed_precision!r}: expected one of {sorted(_DTYPES)}")
    if cache_latents and not cache_dir:
        raise ValueError("cache_latents needs cache_dir (the latents are cached in it)")
    if bf16_adapter and mixed_precision != "bf16":
        raise ValueError(f"bf16_adapter needs mixed_precision 'bf16', got {mixed_precision!r}")
    weight = _DTYPES[mixed_precision]
    vae = torch.float32 if mixed_precision == "fp16" and vae_force_upcast else weight
    return Placement(
        device=torch.device(device),
        weight_dtype=weight,
        vae_dtype=vae,
        trainable_dtype=torch.bfloat16 if bf16_adapter else torch.float32,
        cache_text=bool(cache_dir),
        cache_latents=bool(cache_latents),
    )


def training_components(pipe, *, adapter=None, ema=None) -> dict[str, list]:
    """``{component: [tensors]}``: every parameter and buffer of each component the training steps use.

    The UNet's entry leaves out its LoRA parameters (entry ``lora``) and, once installed, the adapter's
    (entry ``adapter``); ``ema`` holds the EMA's shadow parameters."""
    adapter_ids = (
        {id(t) for t in (*adapter.parameters(), *adapter.buffers())} if adapter is not None else set()
    )
    out = {}
    unet_tensors, lora = [], []
    for name, t in (*pipe.unet.named_parameters(), *pipe.unet.named_buffers()):
        if id(t) in adapter_ids:
            continue
        (lora if "lora_" in name else unet_tensors).append(t)
    out["unet"] = unet_tensors
    for name in ("vae", *TEXT_ENCODERS):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = [*module.parameters(), *module.buffers()]
    if adapter is not None:
        out["adapter"] = [*adapter.parameters(), *adapter.buffers()]
    out["lora"] = lora
    if ema is not None:
        out["ema"] = list(ema.shadow_params)
    return out


def place_for_training(pipe, placement: Placement, *, adapter=None, lora_params=(), ema=None) -> None:
    """Move every component to its place in ``placement.table()`` and check the result.

    The UNet and the encoders go in their dtypes; the LoRA parameters and the adapter (installed or not) go
    to the device in fp32 from their fp32 values, never through the weight dtype; the EMA's copy too. An encoder that
    ``placement`` caches must already be freed (``pipe.<name> = None``): a cached encoder left on the
    pipeline is an error, since it would sit in host memory (or on the device) for nothing."""
    table = placement.table()
    for name in ("vae", *TEXT_ENCODERS):
        if getattr(pipe, name, None) is not None and name not in table:
            raise RuntimeError(
                f"placement: {name} is cached (--cache-dir{' --cache-latents' if name == 'vae' else ''}) and "
                "should have been freed after the cache pass"
            )
    # the LoRA parameters live in the UNet and an installed adapter's fusers too: keep their fp32 values
    # aside so that casting the UNet to the weight dtype does not round them
    trainable = [*lora_params, *((*adapter.parameters(), *adapter.buffers()) if adapter is not None else ())]
    kept = [(t, t.data) for t in trainable]
    pipe.unet.to(*table["unet"])
    for name in ("vae", *TEXT_ENCODERS):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(*table[name])
    device, dtype = table["adapter"]
    for t, data in kept:
        t.data = data.to(device, dtype if data.is_floating_point() else data.dtype)
    if ema is not None:
        ema.to(device=table["ema"][0], dtype=table["ema"][1])
    check_placement(pipe, placement, adapter=adapter, ema=ema)


def check_placement(pipe, placement: Placement, *, adapter=None, ema=None) -> None:
    """Raise naming each component with a parameter or buffer away from its (device, dtype) in the table.

    Integer buffers (position ids, counters) keep their dtype and are checked for their device only."""
    table = placement.table()
    wrong = []
    for name, tensors in training_components(pipe, adapter=adapter, ema=ema).items():
        if name not in table:
            continue
        device, dtype = table[name]
        devices = sorted({str(t.device) for t in tensors if not _same_device(t.device, device)})
        dtypes = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype != dtype})
        if devices or dtypes:
            wrong.append(
                f"{name}: expected {device} {dtype}, found"
                + (f" device {', '.join(devices)}" if devices else "")
                + (f" dtype {', '.join(dtypes)}" if dtypes else "")
            )
    if wrong:
        raise RuntimeError("placement: components away from their place: " + "; ".join(wrong))


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" (the accelerator's device) and "cuda:0" (a tensor's) are one device
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextmanager
def encoders_on_device(pipe, placement: Placement, names):
    """For the cache pass: move only the encoders ``names`` (``vae``, ``text_encoder``, ``text_encoder_2``)
    to their cache-pass place, and on leaving move each back to the device it came from (the host for a
    loaded pipeline), so the next encoder finds the device free. The dtype stays (the cache pass frees the
    encoders it has used once it is done)."""
    table = placement.cache_pass_table()
    moved = []
    try:
        for name in names:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            home = next(iter(module.parameters())).device
            module.to(*table[name])
            moved.append((module, home))
        yield
    finally:
        for module, home in moved:
            module.to(home)
        if placement.device.type == "cuda" and moved:
            torch.cuda.empty_cache()
