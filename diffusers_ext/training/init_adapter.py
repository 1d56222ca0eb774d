"""``--init-adapter``: start training from published adapter weights instead of a fresh adapter.

A user who fine-tunes GLIGEN-XL (a diffusers gated SDXL UNet, ``jiuntian/gligen-xl-1024`` subfolder
``unet``), an official GLIGEN checkpoint or an adapter our trainer saved had no way to hand those weights to
the trainer: it always built a new, identity-at-init adapter. The source is anything
:func:`diffusers_ext.load_spatial_adapter` accepts; the loaded adapter then trains like a fresh one (LoRA, EMA
starting from the loaded weights, cache, checkpoints, accumulation, 8-bit Adam, ``--bf16-adapter``).

The loaded adapter's config decides its shape: ``--layers``, ``--hidden-dim`` and ``--max-objs`` are taken
from it (given, each must equal the loaded value), while ``--init-mode`` and ``--gate-init-value`` describe
only a fresh adapter's first weights and are refused. Every check that configs can answer runs before any
weights load (our folder's ``config.json``; a gated UNet's ``config.json`` built on the meta device and split
the way the loader splits it; for a hub id, those files in the hub cache when it was downloaded before); a
single weights file or a hub id not in the cache is checked right after it loads, still before
``--overwrite`` deletes anything.

Base UNet. GLIGEN checkpoints and gated UNets carry a whole UNet: the frozen base their fusers were trained
against. GLIGEN-XL's is SDXL base, which an SDXL ``--pretrained-model`` already holds, so by default only the
grounding is taken and ``--pretrained-model``'s UNet stays: reading a second copy would cost load time and
host memory for nothing, and the conditioning cache, LoRA and the memory rehearsal all describe that UNet. ``--init-adapter-base-unet`` loads the source's base UNet into the pipeline as well, for checkpoints
whose fusers were trained against another base (GLIGEN's SD1.4 checkpoints on an SD1.5 ``--pretrained-model``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "FRESH_ONLY",
    "INIT_DECIDED",
    "adapter_for_resume",
    "apply_loaded_config",
    "check_before_loading",
    "given_flags",
    "load_init_adapter",
    "looks_like_hub_id",
]

# Flags that only say how a fresh adapter's weights start: loaded weights have already started.
FRESH_ONLY = ("init_mode", "gate_init_value")
# Flags that shape the adapter: the loaded adapter's config decides them; given, they must agree with it.
MUST_MATCH = ("layers", "hidden_dim", "max_objs")
# Every flag whose value --init-adapter decides (a resume compares them once the adapter is loaded); the
# FRESH_ONLY ones stay at their defaults, as they cannot be given.
INIT_DECIDED = MUST_MATCH

# owner/name as the hub spells a repo id: one slash, letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_flags(argv: list[str]) -> set[str]:
    """The option names spelt out on the command line (``--max-objs 4`` and ``--max-objs=4`` alike), so a flag
    left at its default is told apart from one given with the default's value (the parser has
    ``allow_abbrev=False``: a flag is always spelt in full)."""
    return {token.split("=", 1)[0] for token in argv if token.startswith("--") and token != "--"}


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with nothing else: a Hugging Face repo id, downloaded when it loads."""
    return bool(_HUB_ID.fullmatch(source)) and not source.endswith(_WEIGHT_SUFFIXES) and ".." not in source


def _where(args) -> str:
    sub = f" (--init-adapter-subfolder {args.init_adapter_subfolder})" if args.init_adapter_subfolder else ""
    return f"--init-adapter {args.init_adapter}{sub}"


def check_source(args) -> None:
    """SOURCE is a local file or folder (its subfolder too) or has a hub id's form."""
    source, sub = args.init_adapter, args.init_adapter_subfolder
    path = Path(source)
    if path.exists():
        if sub and path.is_dir() and not (path / sub).is_dir():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise SystemExit(
                f"{_where(args)}: {path} has no folder {sub!r} (found {found}); GLIGEN-XL's hub layout keeps "
                "its gated UNet in 'unet'"
            )
        return
    if looks_like_hub_id(source):
        return  # downloaded (or read from the hub cache) when it loads
    raise SystemExit(
        f"--init-adapter {source}: no such file or folder, and not a hub repo id (owner/name). Give a folder "
        "our trainer saved (<output-dir>/adapter), a diffusers gated UNet folder (e.g. GLIGEN-XL's, with "
        "--init-adapter-subfolder unet), an official GLIGEN .pth, or a hub id such as jiuntian/gligen-xl-1024"
    )


def _refuse_fresh_only(args, given: set[str]) -> None:
    named = [_flag(n) for n in FRESH_ONLY if _flag(n) in given]
    if named:
        raise SystemExit(
            f"{' and '.join(named)} with {_where(args)}: these set how a new adapter's weights start, and "
            "the loaded adapter's weights have already started; drop them (the loaded gates and output "
            "layers are kept as they are)"
        )


def _local_folder(args) -> Path | None:
    path = Path(args.init_adapter)
    if not path.is_dir():
        return None
    sub = args.init_adapter_subfolder
    return path / sub if sub else path


def _plain_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _config_file(args, relative: str) -> Path | None:
    """``relative`` (under ``--init-adapter-subfolder``) in a local SOURCE folder, or in the hub cache for a
    hub id downloaded before (no network: a repo not in the cache is checked once it loads)."""
    folder = _local_folder(args)
    if folder is not None:
        path = folder / relative
        return path if path.is_file() else None
    source = args.init_adapter
    if Path(source).exists() or not looks_like_hub_id(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    sub = args.init_adapter_subfolder
    found = try_to_load_from_cache(source, f"{sub}/{relative}" if sub else relative)
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def _describe(args, unet_config: dict) -> dict | None:
    """The config the loaded adapter will have, from config files only: a local folder's, or a hub id's in
    the hub cache (None: a single weights file, or a hub id not downloaded yet; checked once it loads). A
    gated UNet is built on the meta device and split with the loader's own code, so a block this UNet lacks
    or a width it does not have is refused here."""
    ours = _read_json(_config_file(args, "config.json"))
    if ours is not None and ours.get("_class_name") == "SpatialAdapter":
        return _plain_config(ours)
    for relative in ("config.json", "unet/config.json"):  # where the loader looks for a gated UNet
        path = _config_file(args, relative)
        data = _read_json(path)
        if data is None or data.get("attention_type") != "gated":
            continue
        import torch
        from diffusers import UNet2DConditionModel

        from diffusers_ext.gligen_conversion import adapter_from_gated_state_dict

        try:
            with torch.device("meta"):
                gated = UNet2DConditionModel.from_config(_plain_config(data))
                plain = UNet2DConditionModel.from_config(_plain_config(unet_config))
                adapter, _ = adapter_from_gated_state_dict(gated.state_dict(), plain)
        except (KeyError, ValueError, RuntimeError) as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
            raise SystemExit(
                f"{_where(args)}: its gated UNet ({path}) does not fit --pretrained-model "
                f"{args.pretrained_model}'s UNet: {reason}"
            ) from None
        return _plain_config(dict(adapter.config))
    folder = _local_folder(args)
    if folder is None:
        return None  # a weights file, or a hub id not (fully) in the cache
    found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    raise SystemExit(
        f"{_where(args)}: {folder} holds no spatial adapter: expected our save_pretrained folder (config.json "
        "with _class_name SpatialAdapter, e.g. <output-dir>/adapter) or a diffusers gated UNet (config.json or "
        f"unet/config.json with attention_type 'gated'); found {found}. An official GLIGEN .pth is given as "
        "the file itself"
    )


def _check_against_unet(args, config: dict, unet_config: dict) -> None:
    """The adapter's blocks, widths and token width against the pipeline's UNet, naming both sides."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_ext.spatial_adapter import transformer_blocks

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_plain_config(unet_config))
    blocks = transformer_blocks(unet)
    missing = [spec[0] for spec in config["layers"] if spec[0] not in blocks]
    if missing:
        raise SystemExit(
            f"{_where(args)}: its adapter sits on {len(missing)} blocks that --pretrained-model "
            f"{args.pretrained_model}'s UNet lacks (first {missing[:3]}; this UNet's blocks: first "
            f"{list(blocks)[:3]}); it was trained for another UNet"
        )
    for name, width, *_ in config["layers"]:
        own = blocks[name].attn1.to_q.in_features
        if own != width:
            raise SystemExit(
                f"{_where(args)}: its fuser on {name} is {width} wide, --pretrained-model "
                f"{args.pretrained_model}'s block there is {own}; it was trained for another UNet"
            )
    cross = unet_config.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if config["token_dim"] != cross:
        raise SystemExit(
            f"{_where(args)}: its grounding tokens are {config['token_dim']} wide, --pretrained-model "
            f"{args.pretrained_model}'s UNet cross-attends over {cross}; it was trained for another UNet"
        )


def _compare(args, given: set[str], config: dict, unet_config: dict | None) -> None:
    """Given ``--layers``/``--hidden-dim``/``--max-objs`` must equal the loaded adapter's."""
    differ = []
    for name in ("hidden_dim", "max_objs"):
        if _flag(name) in given and getattr(args, name) != config[name]:
            differ.append(f"{_flag(name)} {getattr(args, name)} against its {config[name]}")
    loaded = [spec[0] for spec in config["layers"]]
    if "--layers" in given and unet_config is not None:
        from diffusers_ext.fuser_presets import layers_for_config

        try:
            wanted = layers_for_config(unet_config, args.layers)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if sorted(wanted) != sorted(loaded):
            extra = sorted(set(wanted) - set(loaded))[:2]
            lacking = sorted(set(loaded) - set(wanted))[:2]
            differ.append(
                f"--layers {' '.join(args.layers)} ({len(wanted)} blocks) against its {len(loaded)} blocks "
                f"(only in --layers: {extra}; only in the adapter: {lacking})"
            )
    if differ:
        raise SystemExit(
            f"{_where(args)}: {'; '.join(differ)}. The loaded adapter's weights fix its shape and placement; "
            "leave these flags out to train it as it is (or start a fresh adapter without --init-adapter)"
        )


def apply_loaded_config(args, config: dict) -> None:
    """Put the loaded adapter's shape into ``args``: the data keeps ``--max-objs`` boxes, the memory rehearsal
    builds this adapter, and a checkpoint records what was trained."""
    args.layers = [spec[0] for spec in config["layers"]]
    args.hidden_dim = config["hidden_dim"]
    args.max_objs = config["max_objs"]


def _unet_config(args, pipeline) -> dict | None:
    if pipeline is not None:
        return dict(pipeline.unet.config)
    from diffusers_ext.training.conditioning_cache import model_folder

    try:
        return json.loads((model_folder(args.pretrained_model) / "unet" / "config.json").read_text())
    except Exception:  # noqa: BLE001  (a hub id not yet downloaded: checked after loading)
        return None


def check_before_loading(args, given: set[str], pipeline=None) -> dict | None:
    """Every ``--init-adapter`` check that config files can answer, before any weights load: SOURCE exists
    (or is a hub id), no fresh-adapter flag is given, and where its config files are at hand (a local folder,
    a hub id in the hub cache) its adapter fits
    ``--pretrained-model``'s UNet and agrees with ``--layers``/``--hidden-dim``/``--max-objs`` (then those
    are taken from it). Returns the adapter's config, or None when only loading can tell."""
    check_source(args)
    _refuse_fresh_only(args, given)
    if args.init_adapter_base_unet:
        config = _read_json(_config_file(args, "config.json"))
        if config is not None and config.get("_class_name") == "SpatialAdapter":
            raise SystemExit(
                f"--init-adapter-base-unet with {_where(args)}: that folder holds only an adapter (our "
                "save_pretrained format), no base UNet; drop --init-adapter-base-unet"
            )
    unet_config = _unet_config(args, pipeline)
    if unet_config is None:
        return None
    config = _describe(args, unet_config)
    if config is None:
        return None
    _check_against_unet(args, config, unet_config)
    _compare(args, given, config, unet_config)
    apply_loaded_config(args, config)
    return config


def _check_phrase_width(args, config: dict, phrase_width: int) -> None:
    if config["phrase_dim"] != phrase_width:
        raise SystemExit(
            f"{_where(args)}: its grounding tokenizer takes {config['phrase_dim']}-wide phrase features, "
            f"--pretrained-model {args.pretrained_model}'s text encoders give {phrase_width}; it was trained "
            "for another pipeline"
        )


def _set_trainable(adapter, freeze_gate: bool) -> None:
    """Every weight learns, the gates unless ``--freeze-gate`` (the flag decides, not the loaded config). The
    config keeps the source's ``freeze_gate``: with ``gate_init`` 0 recorded beside it, ``freeze_gate=True``
    would make the saved adapter refuse to load (a frozen zero gate), though its trained gates are open."""
    import torch

    with torch.no_grad():
        for p in adapter.parameters():
            p.requires_grad_(True)
        for fuser in adapter.fusers:
            fuser.alpha_attn.requires_grad_(not freeze_gate)
            fuser.alpha_dense.requires_grad_(not freeze_gate)
    adapter.train()


def adapter_for_resume(args, config: dict, phrase_width: int, checkpoint: Path):
    """On a resume the checkpoint holds every adapter weight, and they win: the adapter is shaped from
    ``config`` (:func:`check_before_loading`'s) without reading ``--init-adapter``'s weights (GLIGEN-XL's
    gated UNet is 4.4 B parameters to read only to be overwritten). Returns None when the checkpoint lacks
    an adapter weight (then the init weights are loaded under it)."""
    import torch
    from safetensors import safe_open

    from diffusers_ext.spatial_adapter import SpatialAdapter

    _check_phrase_width(args, config, phrase_width)
    with safe_open(str(checkpoint / "trainable.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    with torch.device("meta"):  # no memory, no random draws: every tensor is the checkpoint's
        adapter = SpatialAdapter.from_config(config)
    if {f"adapter.{k}" for k in adapter.state_dict()} - saved:
        return None
    adapter.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in adapter.state_dict().values():
            tensor.zero_()  # defined values until the checkpoint's are copied in
    _set_trainable(adapter, args.freeze_gate)
    return adapter


def load_init_adapter(args, pipe, phrase_width: int, given: set[str]):
    """Load ``--init-adapter`` with :func:`~diffusers_ext.load_spatial_adapter` (``load_base_unet`` only with
    ``--init-adapter-base-unet``), take it off the pipeline again (the trainer installs it after LoRA, so
    peft never wraps the fusers' projections), check it against the pipeline and the flags, and put its
    shape into ``args``. ``--freeze-gate`` decides whether its gates learn. Returns the adapter, on the
    host, every other parameter trainable."""
    from diffusers_ext.loaders import load_spatial_adapter

    try:
        adapter = load_spatial_adapter(
            pipe,
            args.init_adapter,
            subfolder=args.init_adapter_subfolder,
            load_base_unet=args.init_adapter_base_unet,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"{_where(args)}: {e}") from None
    adapter.remove()
    config = _plain_config(dict(adapter.config))
    _check_phrase_width(args, config, phrase_width)
    unet_config = dict(pipe.unet.config)
    _check_against_unet(args, config, unet_config)
    _compare(args, given, config, unet_config)
    apply_loaded_config(args, config)
    gates = [p for f in adapter.fusers for p in (f.alpha_attn, f.alpha_dense)]
    if args.freeze_gate and all(float(g) == 0.0 for g in gates):
        raise SystemExit(
            f"--freeze-gate with {_where(args)}: every loaded gate is 0, and a frozen zero gate never opens "
            "(tanh(0) = 0 stops every gradient); drop --freeze-gate"
        )
    _set_trainable(adapter, args.freeze_gate)
    return adapter
