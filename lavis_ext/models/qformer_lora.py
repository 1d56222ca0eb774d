"""Optional LoRA (Hu et al., ICLR 2022) on the Q-Former, from the model config's ``lora`` key, via peft.

``lora: {r, alpha, dropout, target_modules}`` injects peft LoRA layers into the Q-Former in place
(:func:`peft.inject_adapter_in_model`, so parameter names stay LAVIS's plus ``lora_A`` / ``lora_B``) and
freezes the Q-Former's own weights; everything outside the Q-Former keeps its usual trainability. LAVIS's
runner saves only parameters with ``requires_grad`` (``RunnerBase._save_checkpoint``), so a LoRA run's
checkpoints hold the adapters and the small heads, not the frozen Q-Former. LoRA is applied after the
pretrained checkpoint is loaded, so SPRC / BLIP-2 checkpoints keep loading with their own key names.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LORA_KEYS", "apply_qformer_lora", "check_lora_config"]

# accepted keys -> (types, default); target_modules: names (or name suffixes) of the Q-Former's nn.Linear layers
LORA_KEYS: dict[str, tuple[tuple[type, ...], object]] = {
    "r": ((int,), None),
    "alpha": ((int, float), None),
    "dropout": ((int, float), 0.0),
    "target_modules": ((list, tuple, str), ("query", "value")),
}


def check_lora_config(lora: dict) -> dict:
    """Validated ``lora`` config with defaults filled in; raises before anything is built."""
    if not isinstance(lora, dict):
        raise TypeError(
            f"model config 'lora' must be a mapping {{r, alpha, dropout, target_modules}}, got {lora!r}"
        )
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in model config 'lora'; accepted: {sorted(LORA_KEYS)}")
    values = {}
    for key, (kinds, default) in LORA_KEYS.items():
        value = lora.get(key, default)
        if value is None:
            raise ValueError(f"model config 'lora.{key}' is required (accepted keys: {sorted(LORA_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, kinds):
            accepted = " or ".join(kind.__name__ for kind in kinds)
            raise TypeError(f"model config 'lora.{key}' must be {accepted}, got {value!r}")
        values[key] = value
    if values["r"] <= 0:
        raise ValueError(f"model config 'lora.r' must be a positive int (the LoRA rank), got {values['r']}")
    if values["alpha"] <= 0:
        raise ValueError(f"model config 'lora.alpha' must be > 0, got {values['alpha']}")
    if not 0.0 <= values["dropout"] < 1.0:
        raise ValueError(f"model config 'lora.dropout' must be in [0, 1), got {values['dropout']}")
    targets = (
        [values["target_modules"]] if isinstance(values["target_modules"], str) else values["target_modules"]
    )
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"model config 'lora.target_modules' must be non-empty module names, got {targets!r}"
        )
    values["target_modules"] = list(targets)
    return values


def apply_qformer_lora(qformer: nn.Module, lora: dict) -> nn.Module:
    """Inject LoRA into ``qformer`` in place and freeze its non-LoRA weights; returns ``qformer``."""
    from peft import LoraConfig, inject_adapter_in_model

    values = check_lora_config(lora)
    linear_names = {name for name, module in qformer.named_modules() if isinstance(module, nn.Linear)}
    for target in values["target_modules"]:
        if not any(name == target or name.endswith("." + target) for name in linear_names):
            examples = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
            raise ValueError(
                f"model config 'lora.target_modules' entry {target!r} matches no nn.Linear of the Q-Former; "
                f"its linear layers are named {examples}"
            )
    config = LoraConfig(
        r=values["r"],
        lora_alpha=values["alpha"],
        lora_dropout=float(values["dropout"]),
        target_modules=values["target_modules"],
        bias="none",
    )
    inject_adapter_in_model(config, qformer)
    for name, param in qformer.named_parameters():
        param.requires_grad = "lora_" in name
    return qformer
