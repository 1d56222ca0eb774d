"""The adapter's optimizer: AdamW, bitsandbytes' 8-bit AdamW, and bf16 adapter weights with stochastic rounding.

API (the trainer's ``--optimizer`` / ``--use-8bit-adam`` / ``--bf16-adapter`` flags map onto it):

- ``build_optimizer(params, *, name="adamw", lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
  bf16_stochastic_rounding=False, seed=0)`` -> a ``torch.optim.Optimizer``. ``name`` is one of
  :data:`OPTIMIZERS`: ``"adamw"`` (``torch.optim.AdamW``, two fp32 moments) or ``"adamw8bit"``
  (``bitsandbytes.optim.AdamW8bit``, Dettmers et al. 2022: both moments block-wise quantised to uint8,
  the flag every diffusers SDXL example offers as ``--use_8bit_adam``; bitsandbytes >= 0.50 runs it on
  CPU too). ``bf16_stochastic_rounding=True`` expects bf16 parameters (``adapter.to(torch.bfloat16)``)
  and works with either name.
- ``bytes_per_parameter(name, *, bf16_stochastic_rounding=False)`` -> the claimed bytes per adapter
  parameter of weights, gradients and optimizer state (what a memory plan multiplies by the parameter
  count); ``optimizer_state_bytes(optimizer)`` measures the state actually held.
- ``stochastic_round_to_bf16(x, generator=None)``: the rounding itself.

The state dict of every optimizer built here saves and loads through ``optimizer.state_dict()`` /
``load_state_dict()`` (accelerate's ``save_state``/``load_state`` included) so that a resumed run takes a
bit-equal next step: the stochastic-rounding generator's state travels in the state dict (one per device
type, so every rank resumes the state rank 0 saved). The state dict also names its optimizer and weight
precision (``"lever"``), and loading it into an optimizer built with other settings raises, naming both.
Every optimizer here also steps on the meta device (the memory rehearsal).

Why stochastic rounding and not the optimizer step in the backward pass. Both bring all 70 SDXL fusers
(1.81 B parameters) from about 23 GB to about 16 GB with 8-bit state (issue 28's arithmetic). A step in
the backward pass (per-parameter hooks, so gradients never all live at once) cannot accumulate gradients
over micro-batches, cannot clip by the global norm, and fights DDP's bucketed all-reduce; gradient
accumulation is what gives an effective batch of 8 at batch 1 on a 24 GB card, so it loses. bf16 weights
and gradients keep every one of those. Plain bf16 weights stall: with round-to-nearest an update smaller
than half a bf16 ulp (2^-9 of the weight) is lost, and AdamW at lr 5e-5 makes almost only such updates.
Rounding stochastically (Zamirai et al. 2020, "Revisiting BFloat16 Training"; torchao's low-bit
optimizers do the same with ``bf16_stochastic_round=True``) keeps every update in expectation: each
parameter's step is computed in fp32 from an fp32 copy of that one parameter, then rounded down or up
with probability given by the distance, so at most one parameter's fp32 copy exists at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "bytes_per_parameter",
    "optimizer_state_bytes",
    "stochastic_round_to_bf16",
]

OPTIMIZERS = {
    "adamw": "torch.optim.AdamW: fp32 first and second moments (8 bytes of state per parameter)",
    "adamw8bit": "bitsandbytes AdamW8bit: block-wise uint8 moments (about 2 bytes of state per parameter)",
}
# bitsandbytes keeps tensors smaller than this in 32-bit state (its default min_8bit_size)
MIN_8BIT_SIZE = 4096
# bitsandbytes' block-wise quantisation: one fp32 absmax per 256 values, for each of the two moments
_BNB_BLOCK = 256
_SR_KEY = "bf16_stochastic_rounding"
_LEVER_KEY = "lever"


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, up or down at random with probability proportional to the distance.

    bf16 is the upper 16 bits of fp32: adding a uniform integer in [0, 2^16) to the bit pattern and
    dropping the low 16 bits rounds up exactly with probability (low bits) / 2^16, so E[round(x)] = x
    (Zamirai et al. 2020). For negative numbers the bit pattern is sign-magnitude, so the carry still
    moves away from zero with that probability; infinities stay infinite.
    """
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _groups(params) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("build_optimizer got no parameters (is every adapter weight frozen?)")
    if isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


def _check_dtypes(groups: list[dict], bf16_stochastic_rounding: bool) -> None:
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            where = f"parameter {pi} of group {gi} (shape {tuple(p.shape)})"
            if bf16_stochastic_rounding and p.dtype != torch.bfloat16:
                raise ValueError(
                    f"bf16_stochastic_rounding needs bf16 parameters, {where} is {p.dtype}; cast the adapter "
                    "with adapter.to(torch.bfloat16) before building the optimizer, or keep fp32 weights "
                    "without the flag"
                )
            if not bf16_stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{where} is {p.dtype}: updating half-precision weights with round-to-nearest loses every "
                    "step smaller than half an ulp (AdamW at GLIGEN's lr 5e-5 makes almost only such steps) "
                    "and training stalls. Keep the adapter in fp32, or cast it to bf16 and pass "
                    "bf16_stochastic_rounding=True (--bf16-adapter)"
                )


def build_optimizer(
    params: Iterable,
    *,
    name: str = "adamw",
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bf16_stochastic_rounding: bool = False,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors or parameter-group dicts) with the chosen state and weight precision.

    Args:
        params: the trainable adapter (and LoRA) parameters, or parameter groups.
        name: ``"adamw"`` or ``"adamw8bit"`` (:data:`OPTIMIZERS`).
        lr, weight_decay, betas, eps: AdamW's (decoupled weight decay, Loshchilov & Hutter 2019).
        bf16_stochastic_rounding: the parameters are bf16; each step is taken in fp32 and rounded
            stochastically back to bf16 (module docstring). Give every process the same ``seed``: with
            all-reduced gradients the ranks then round identically and stay in sync.
        seed: seeds the rounding generator (ignored without ``bf16_stochastic_rounding``).

    Raises:
        ValueError: an unknown name, a non-positive or non-finite lr, a negative weight decay, or
            parameters whose dtype does not fit the chosen weight precision, before any state is made.

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> opt = build_optimizer(layer.parameters(), name="adamw", lr=1e-3)
        >>> type(opt).__name__
        'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    groups = _groups(params)
    _check_dtypes(groups, bf16_stochastic_rounding)
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
    cls = _optimizer_class(name, bf16_stochastic_rounding)
    if name == "adamw" and not bf16_stochastic_rounding:
        return cls(groups, **kwargs)
    if bf16_stochastic_rounding:
        kwargs["seed"] = seed
    return cls(groups, min_8bit_size=MIN_8BIT_SIZE, **kwargs)


def _describe(lever: dict) -> str:
    return f"optimizer {lever.get('name')!r} with bf16_stochastic_rounding={lever.get('bf16_stochastic_rounding')}"


class _LeverTag:
    """Saves which optimizer and weight precision made a state, and refuses to load it into another: torch's
    AdamW would take an 8-bit state's dict without a word and fail at the next step, and an 8-bit AdamW
    given fp32 moments would quietly start from zero."""

    _lever: dict = {}

    def state_dict(self):
        state = super().state_dict()
        state[_LEVER_KEY] = dict(self._lever)
        return state

    def load_state_dict(self, state_dict, *args, **kwargs):
        saved = state_dict.get(_LEVER_KEY)
        if saved is not None and dict(saved) != self._lever:
            raise ValueError(
                f"the optimizer state was saved by {_describe(saved)}, this run uses {_describe(self._lever)}; "
                "resume with the optimizer flags it was saved with (--use-8bit-adam, --bf16-adapter)"
            )
        state_dict = {k: v for k, v in state_dict.items() if k != _LEVER_KEY}
        return super().load_state_dict(state_dict, *args, **kwargs)


class _StochasticRounding:
    """bitsandbytes' per-parameter ``update_step`` run on an fp32 copy of the one parameter, the result
    rounded stochastically into the bf16 weight (module docstring)."""

    def __init__(self, params, *, seed: int = 0, **kwargs):
        super().__init__(params, **kwargs)
        self._sr_seed = int(seed)
        # keyed by device type, not index: rank 1's cuda:1 must continue the state rank 0 saved from cuda:0
        self._sr_generators: dict[str, torch.Generator] = {}
        self._sr_pending: dict[str, torch.Tensor] = {}  # loaded states, applied when a device is first used
        # bitsandbytes casts floating state to the parameter's dtype on load; the moments are fp32 (or uint8)
        # whatever the weights are, and a bf16 round trip would break the exact resume
        self.non_castable_tensor_keys = set(self.non_castable_tensor_keys) | {"state1", "state2"}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        key = device.type
        if key == "meta":  # the memory rehearsal's step: no data, and meta takes no generator
            return None
        if key not in self._sr_generators:
            generator = torch.Generator(device=device).manual_seed(self._sr_seed)
            if key in self._sr_pending:
                # accelerate may have moved the byte tensor to the training device; generators take CPU bytes
                generator.set_state(self._sr_pending.pop(key).cpu())
            self._sr_generators[key] = generator
        return self._sr_generators[key]

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        weight, grad = p.data, p.grad
        p.grad = None  # a grad must match its parameter's dtype at assignment
        p.data = weight.float()
        p.grad = grad.float()
        try:
            super().update_step(group, p, gindex, pindex)
            weight.copy_(stochastic_round_to_bf16(p.data, self._generator(p.device)))
        finally:
            p.grad = None
            p.data = weight
            p.grad = grad

    def state_dict(self):
        state = super().state_dict()
        generators = {k: g.get_state() for k, g in self._sr_generators.items()}
        state[_SR_KEY] = {"seed": self._sr_seed, "generators": {**self._sr_pending, **generators}}
        return state

    def load_state_dict(self, state_dict, move_to_device=True):
        state_dict = dict(state_dict)
        saved = state_dict.pop(_SR_KEY, None)
        if saved is None:
            raise ValueError(
                "the optimizer state holds no stochastic-rounding generator: it was saved without "
                "bf16_stochastic_rounding (--bf16-adapter); resume with the flags it was saved with"
            )
        super().load_state_dict(state_dict, move_to_device=move_to_device)
        self._sr_seed = int(saved["seed"])
        self._sr_generators = {}
        self._sr_pending = dict(saved["generators"])


_CLASSES: dict[tuple[str, bool], type] = {}


def import_bitsandbytes():
    """``import bitsandbytes``, without its notice about the 4-bit CPU kernel this package never uses."""
    from diffusers_ext._quiet import quiet_4bit_notice

    quiet_4bit_notice()
    import bitsandbytes

    return bitsandbytes


def _optimizer_class(name: str, bf16_stochastic_rounding: bool) -> type:
    key = (name, bf16_stochastic_rounding)
    if key in _CLASSES:
        return _CLASSES[key]
    if name == "adamw" and not bf16_stochastic_rounding:
        base, label = torch.optim.AdamW, "AdamW"
    else:
        bnb = import_bitsandbytes()
        base = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.AdamW32bit
        label = "AdamW8bit" if name == "adamw8bit" else "AdamW"
    bases = (_LeverTag, _StochasticRounding, base) if bf16_stochastic_rounding else (_LeverTag, base)
    if bf16_stochastic_rounding:
        label = f"StochasticRounding{label}"
    lever = {"name": name, "bf16_stochastic_rounding": bf16_stochastic_rounding}
    cls = type(label, bases, {"_lever": lever, "__module__": __name__, "__qualname__": label})
    _CLASSES[key] = cls
    return cls


def bytes_per_parameter(name: str, *, bf16_stochastic_rounding: bool = False) -> dict[str, float]:
    """Claimed bytes per trainable parameter: ``weights``, ``gradients``, ``optimizer_state`` and ``total``.

    For tensors of at least :data:`MIN_8BIT_SIZE` values (every fuser weight at published size); the
    8-bit state adds one fp32 absmax per 256 values per moment. Example: 1.81 B parameters (all 70 SDXL
    fusers) x ``total`` of ``adamw`` (16 B) = 29 GB; of ``adamw8bit`` with bf16 weights (6.03 B) = 10.9 GB.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    weight = 2.0 if bf16_stochastic_rounding else 4.0
    state = 2 * (1 + 4 / _BNB_BLOCK) if name == "adamw8bit" else 8.0
    return {"weights": weight, "gradients": weight, "optimizer_state": state, "total": 2 * weight + state}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (moments, quantisation scales; shared quantisation maps once)."""
    seen: set[int] = set()
    total = 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total
