"""Demo: train the gated spatial adapter on a tiny pixel-space UNet on toy-world layouts, on CPU in minutes.

Two phases, as in GLIGEN (Li et al., CVPR 2023): (1) a tiny text-conditioned UNet learns toy scenes from
their object phrases alone, so it knows colours and shapes but not where they go; (2) the UNet is frozen
and only the SpatialAdapter (grounding tokenizer + gated self-attention) trains on (phrase, box) pairs.
The adapter starts as an exact identity (with ``init_mode="zero_out"``, the default here, its output
layers start at 0; with GLIGEN's ``"gate"`` its gates do) and must leave that point for layout control to
appear. The evaluation generates held-out layouts from the same noise with and without the adapter and
scores each object's placement by colour segmentation (``evaluation.layout_scoring.layout_scores``).

Phrase features are fixed random vectors per colour / shape / size word (no text encoder is downloaded);
the UNet's cross-attention context is the sequence of the scene's phrase features. All sizes and step
counts live in ``DEMO_CONFIG``; ``QUICK_CONFIG`` shrinks them for ``--quick`` (the command-line test).
Phase 1 can be run once and saved (``--train-base FILE``: UNet and phrase vectors in one safetensors file
with the config they were trained with); ``--base-unet FILE`` then trains only the adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vlext.atomic_files import atomic_save_figure, atomic_save_image, atomic_write_json

# torch, diffusers, numpy and PIL are imported by the functions that use them, so that
# `python -m diffusers_ext.demo --help` answers at once instead of after a 20 s import.
if TYPE_CHECKING:
    import torch
    from PIL import Image

    from vlext.toyworld import ToyWorld

__all__ = ["DEMO_CONFIG", "QUICK_CONFIG", "load_base", "run", "save_base", "train_base"]

SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "demo_base_unet.safetensors"
SHIPPED_BASE_SHA256 = "70a74c47a9885546d226402dc2aae21525ad7933a30afef35893b866e390e639"

DEMO_CONFIG = {
    "seed": 0,
    "render_size": 32,  # ToyWorld's smallest image; downsampled to the UNet's resolution
    "resolution": 16,
    # one object per scene: with up to two the adapter's lead was smaller (mean IoU 0.08 vs 0.06)
    "max_objects": 1,
    # plain backgrounds: the phrases say nothing about texture, so a textured background is variance the
    # denoising loss cannot explain and that drowns the layout signal the adapter learns from
    "backgrounds": ("plain",),
    "n_train": 512,
    "n_eval": 64,
    "text_dim": 32,
    "batch_size": 32,
    # 400 steps left samples so washed out that the colour detector found only 26 of 64 objects
    "base_steps": 1200,
    "base_lr": 2e-3,
    # the adapter's loss falls slowly for ~250 steps, then fast; layout control grows with it (one object,
    # timesteps 120-199, mean IoU / centre in box at step 400: 0.29 / 67 %, 800: 0.33 / 73 %, 1000: 0.51 / 94 %,
    # 1200: 0.46-0.50 / 86-89 %; no adapter 0.075 / 19 %). 1000 keeps `make demo` under 10 minutes on 2 cores
    "adapter_steps": 1000,
    "adapter_lr": 3e-3,
    # the number of steps is what counts: batch 16 for 1200 steps scored 0.19 / 41 %, lr 5e-3 for 800 steps
    # 0.32 / 72 %, a cosine decay over 800 steps 0.28 / 67 % (lr 5e-3) and 0.20 / 52 % (lr 8e-3)
    "adapter_batch_size": 32,
    "adapter_lr_schedule": "constant",  # any name diffusers.optimization.get_scheduler knows
    "adapter_hidden_dim": 64,
    # self-attention only at 8x8 (DownBlock2D at 16x16): CPU attention over 256 tokens with 8-dim heads
    # cost 40% of a step; layout at 2-pixel granularity is all the toy world needs
    "unet": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    },
    "train_timesteps": 200,
    # the adapter phase samples only timesteps >= this. Where the objects go is decided in the first,
    # noisiest sampling steps; below them x_t already shows the layout, the boxes add little and those
    # steps dilute the adapter's gradient. At step 400 (zero_out): 120 gave mean IoU 0.29 (centre in box
    # 67 %), 160 gave 0.23 (62 %), 80 gave 0.12 (23 %); all timesteps (earlier runs) stayed near the no-adapter 0.075
    "adapter_min_timestep": 120,
    # GLIGEN's "gate" init (gate 0, normal weights) learns the layout far more slowly here: while the gate is
    # small the branch's effect on the output is too (its weights get Adam-sized steps, but multiplied by a
    # gate near 0); at step 800 it was still at the no-adapter level (0.08 / 16 %) where zero_out had
    # 0.33 / 73 %. "zero_out" (output layers 0, gate tanh(1)) is the second init mode
    "adapter_init_mode": "zero_out",
    # the UNet predicts the clean image: a model this small trained this briefly gives clean samples
    # from x0-prediction, where epsilon-prediction leaves visible noise that colour segmentation trips on
    "prediction_type": "sample",
    # two extra input channels holding each pixel's (x, y): a UNet this shallow has almost no sense of
    # where a token is (only zero padding at the borders), and a box is useless to a token that cannot
    # tell whether it lies inside it; SD's deep UNet gets this from its depth and receptive field
    "coord_channels": True,
    "sample_steps": 20,
    "log_every": 25,
    # the frozen base (phase 1, done once, as a user starts from a pretrained SD): a file written by
    # save_base, trained with this config's BASE_KEYS; the default ships with the package (made by
    # `OMP_NUM_THREADS=1 python -m diffusers_ext.demo --train-base diffusers_ext/assets/demo_base_unet.safetensors`,
    # 1200 steps). None trains one here for base_steps steps first.
    "base_unet": str(SHIPPED_BASE),
    # a base_unet file whose sha256 differs is refused (a damaged or replaced file); None skips the check
    "base_sha256": SHIPPED_BASE_SHA256,
    # the trainer's memory levers (issue 28; benchmarks/bench_diffusers_adapter_levers.py weighs what each
    # costs in layout control): a fuser preset or block prefixes (None: every block, GLIGEN), the optimizer
    # (diffusers_ext.training.optimizers: "adamw" or "adamw8bit"), each batch split into this many
    # micro-batches whose gradients add up (the trainer's --gradient-accumulation-steps), and bf16 adapter
    # weights with stochastic rounding under bf16 autocast (--bf16-adapter; sampled in fp32 like the others)
    "adapter_layers": None,
    "adapter_optimizer": "adamw",
    "gradient_accumulation_steps": 1,
    "bf16_adapter": False,
}

# --quick (the command-line test): the same path with a short adapter phase and a small evaluation
QUICK_CONFIG = {"adapter_steps": 30, "n_eval": 8, "sample_steps": 5, "log_every": 5}
QUICK_BASE_STEPS = 40  # when --quick trains its base here (base_unet=None)


def _phrase_table(dim: int, seed: int) -> dict[str, torch.Tensor]:
    import torch

    from vlext.toyworld import COLORS, SHAPES, SIZES

    g = torch.Generator().manual_seed(seed + 17)
    words = [*COLORS, *SHAPES, *SIZES]
    return {w: torch.randn(dim, generator=g) / dim**0.5 for w in words}


def _dataset(world: ToyWorld, start: int, n: int, cfg: dict, table: dict):
    import numpy as np
    import torch
    from PIL import Image

    res, k = cfg["resolution"], cfg["max_objects"]
    images, context, boxes, masks, requests = [], [], [], [], []
    for scene in world.scenes(n, start=start):
        img = scene.render().resize((res, res), Image.BOX)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
        feats = torch.zeros(k, cfg["text_dim"])
        b = torch.zeros(k, 4)
        m = torch.zeros(k)
        for i, obj in enumerate(scene.objects):
            feats[i] = table[obj.color] + table[obj.shape] + table[obj.size]
            b[i] = torch.tensor(obj.box)
            m[i] = 1
        context.append(feats)
        boxes.append(b)
        masks.append(m)
        requests.append([(o.color, o.box) for o in scene.objects])
    return torch.stack(images), torch.stack(context), torch.stack(boxes), torch.stack(masks), requests


def _with_coords(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    if not cfg["coord_channels"]:
        return x
    import torch

    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.cat([x, torch.stack([xs, ys]).expand(b, 2, h, w)], dim=1)


def _sample(unet, adapter, context, boxes, masks, cfg, noise, desc="sample") -> list[Image.Image]:
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image
    from tqdm.auto import tqdm

    sched = DDIMScheduler(
        num_train_timesteps=cfg["train_timesteps"],
        beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg["prediction_type"],
    )
    sched.set_timesteps(cfg["sample_steps"])
    x = noise.clone()
    kwargs = None
    if adapter is not None:
        kwargs = adapter.cross_attention_kwargs(boxes, context, masks)
    with torch.no_grad():
        for t in tqdm(sched.timesteps, desc=desc, unit="step", mininterval=2.0, leave=False):
            eps = unet(_with_coords(x, cfg), t, context, cross_attention_kwargs=kwargs).sample
            x = sched.step(eps, t, x).prev_sample
    arrays = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _train(unet, params, data, steps, lr, cfg, adapter=None, log=None, desc="train", seed=None):
    """``steps`` AdamW steps on random batches of ``data``; the base phase when ``adapter`` is None.

    ``seed`` (default ``cfg["seed"]``) draws the batches, noise and timesteps. For the adapter the levers of
    ``cfg`` apply: ``adapter_optimizer``, ``gradient_accumulation_steps`` (the batch, drawn as one, is split
    into micro-batches whose mean-loss gradients add up to the batch's) and ``bf16_adapter``.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    images, context, boxes, masks, _ = data
    noise_sched = DDPMScheduler(
        num_train_timesteps=cfg["train_timesteps"],
        beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg["prediction_type"],
    )
    seed = cfg["seed"] if seed is None else seed
    bf16 = adapter is not None and cfg["bf16_adapter"]
    if adapter is None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        from diffusers_ext.training.optimizers import build_optimizer

        opt = build_optimizer(
            params, name=cfg["adapter_optimizer"], lr=lr, bf16_stochastic_rounding=bf16, seed=seed
        )
    schedule = "constant" if adapter is None else cfg["adapter_lr_schedule"]
    lr_sched = get_scheduler(schedule, opt, num_warmup_steps=0, num_training_steps=steps)
    batch = cfg["batch_size"] if adapter is None else cfg["adapter_batch_size"]
    micro = 1 if adapter is None else cfg["gradient_accumulation_steps"]
    g = torch.Generator().manual_seed(seed + (1 if adapter is None else 2))
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        t_min = 0 if adapter is None else cfg["adapter_min_timestep"]
        t = torch.randint(t_min, cfg["train_timesteps"], (len(idx),), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        target = x0 if cfg["prediction_type"] == "sample" else noise
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for part in torch.arange(len(idx)).chunk(micro):  # one part unless gradients are accumulated
            i = idx[part]
            kwargs = (
                None if adapter is None else adapter.cross_attention_kwargs(boxes[i], context[i], masks[i])
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = unet(
                    _with_coords(xt[part], cfg), t[part], context[i], cross_attention_kwargs=kwargs
                ).sample
            part_loss = F.mse_loss(pred.float(), target[part]) * (len(part) / len(idx))
            part_loss.backward()
            loss += part_loss.detach()
        opt.step()
        lr_sched.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}", refresh=False)
        if log is not None and (step % cfg["log_every"] == 0 or step == steps - 1):
            log(step, losses)
    bar.close()
    return losses


def _output_layer_norm(adapter) -> float:
    """L2 norm over every fuser's output layers (``to_out``, ``ff_out``), weights and biases."""
    import torch

    layers = [layer for fuser in adapter.fusers for layer in (fuser.to_out, fuser.ff_out)]
    return float(
        torch.stack([p.detach().pow(2).sum() for layer in layers for p in layer.parameters()]).sum().sqrt()
    )


def _grid(rows: dict[str, list], requests, path: Path, scale: int = 6) -> None:
    """One labelled row of images per method, the requested boxes drawn on each."""
    from PIL import Image, ImageDraw, ImageFont

    from vlext.toyworld import COLORS

    first = next(iter(rows.values()))
    size, n, margin = first[0].size[0] * scale, len(first), 80
    canvas = Image.new("RGB", (margin + n * (size + 2), len(rows) * (size + 2)), "white")
    draw_canvas = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)  # Pillow's bundled font: no font file needed
    for r, (label, row) in enumerate(rows.items()):
        draw_canvas.text((4, r * (size + 2) + size // 2 - 7), label, fill="black", font=font)
        for c, img in enumerate(row):
            tile = img.resize((size, size), Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            for color, box in requests[c]:
                draw.rectangle([v * size for v in box], outline=COLORS[color], width=2)
            canvas.paste(tile, (margin + c * (size + 2), r * (size + 2)))
    atomic_save_image(canvas, path)


def _plot(curve: dict, out_norm_init: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.2))
    a.plot(curve["step"], curve["loss"], label="adapter phase (running mean of 25)")
    a.set_xlabel("step")
    a.set_ylabel("denoising loss")
    a.legend()
    b.plot(curve["step"], curve["gate_mean"], label="mean tanh(alpha)")
    b.plot(curve["step"], curve["gate_abs_mean"], "--", label="mean |tanh(alpha)|")
    b.set_xlabel("step")
    b.set_ylabel("gate over layers")
    b.legend()
    # the zero-init quantity of init_mode="zero_out", from its value before the first update
    c.plot([0] + [s + 1 for s in curve["step"]], [out_norm_init, *curve["out_norm"]])
    c.set_xlabel("optimizer steps taken")
    c.set_ylabel("output-layer norm (to_out, ff_out)")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)


# The config keys that define the base UNet and its phrase vectors; a base read from a file must match them.
BASE_KEYS = (
    "seed", "render_size", "resolution", "max_objects", "backgrounds", "n_train", "text_dim", "batch_size",
    "base_steps", "base_lr", "unet", "train_timesteps", "prediction_type", "coord_channels",
)  # fmt: skip
BASE_COMMAND = "python -m diffusers_ext.demo --train-base FILE"


def _world(cfg: dict) -> ToyWorld:
    from vlext.toyworld import ToyWorld

    return ToyWorld(
        seed=cfg["seed"],
        image_size=cfg["render_size"],
        max_objects=cfg["max_objects"],
        backgrounds=cfg["backgrounds"],
    )


def _new_unet(cfg: dict):
    from diffusers_ext.testing.tiny_unet import tiny_unet

    return tiny_unet(
        sample_size=cfg["resolution"],
        in_channels=5 if cfg["coord_channels"] else 3,
        out_channels=3,
        cross_attention_dim=cfg["text_dim"],
        **cfg["unet"],
    )


def _base_config(cfg: dict) -> dict:
    return json.loads(json.dumps({key: cfg[key] for key in BASE_KEYS}))  # tuples -> lists, as stored


def train_base(cfg: dict) -> tuple:
    """Phase 1: the tiny UNet learns toy scenes from their phrases alone (the stand-in for a pretrained SD).

    Returns ``(unet, phrase_table, losses)``; the phrase table is the stand-in text encoder and belongs to
    the base: an adapter trained on top of it must use the same vectors.
    """
    import torch

    torch.manual_seed(cfg["seed"])
    table = _phrase_table(cfg["text_dim"], cfg["seed"])
    train = _dataset(_world(cfg), 0, cfg["n_train"], cfg, table)
    unet = _new_unet(cfg)
    losses = _train(unet, unet.parameters(), train, cfg["base_steps"], cfg["base_lr"], cfg, desc="base UNet")
    return unet, table, losses


def save_base(path: Path, unet, table: dict, cfg: dict, losses: list[float]) -> None:
    """Write the base UNet (fp16) and its phrase vectors (fp32) to one safetensors file, atomically."""
    import numpy as np
    import torch
    from safetensors.torch import save

    from vlext.atomic_files import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    words = list(table)
    tensors = {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    tensors["phrases"] = torch.stack([table[w] for w in words]).float().contiguous()
    metadata = {
        "format": "vlext-demo-base-unet/1",
        "config": json.dumps(_base_config(cfg), sort_keys=True),
        "phrase_words": json.dumps(words),
        "command": BASE_COMMAND,
        "loss_first_25": f"{np.mean(losses[:25]):.5f}",
        "loss_last_25": f"{np.mean(losses[-25:]):.5f}",
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_base(path: Path, cfg: dict, sha256: str | None = None) -> tuple:
    """Read a base written by :func:`save_base`: ``(unet, phrase_table, metadata)``.

    Refuses a file whose sha256 differs from ``sha256`` (a damaged or replaced download) and a base whose
    config differs from ``cfg`` in any of ``BASE_KEYS`` (an adapter must train on the base it will run on).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base UNet file {path} does not exist; make it with: {BASE_COMMAND}")
    if sha256 is not None and (actual := _sha256(path)) != sha256:
        raise ValueError(
            f"base UNet file {path} has sha256 {actual}, expected {sha256}: the file is damaged or was "
            f"replaced; restore it from git or remake it with: {BASE_COMMAND} (and update BASE_SHA256)"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "vlext-demo-base-unet/1":
            raise ValueError(f"{path} is not a demo base UNet (metadata format {metadata.get('format')!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    stored, wanted = json.loads(metadata["config"]), _base_config(cfg)
    diff = {k: (stored.get(k), wanted[k]) for k in BASE_KEYS if stored.get(k) != wanted[k]}
    if diff:
        raise ValueError(
            f"base UNet {path} was trained with another config; differing keys (file, requested): {diff}. "
            "Use base_unet=None to train a base for this config"
        )
    unet = _new_unet(cfg)
    state = {k.removeprefix("unet."): v.float() for k, v in tensors.items() if k.startswith("unet.")}
    unet.load_state_dict(state, strict=True)
    table = dict(zip(json.loads(metadata["phrase_words"]), tensors["phrases"], strict=True))
    return unet, table, metadata


def _base(cfg: dict) -> tuple:
    """The frozen base: trained here (``base_unet=None``) or read from a file written by ``save_base``."""
    source = cfg["base_unet"]
    if source is None:
        import numpy as np
        import torch

        print(
            f"diffusers_ext: training a base UNet for {cfg['base_steps']} steps (base_unet=None)", flush=True
        )
        with torch.random.fork_rng():  # the adapter's init then depends on the training seed alone
            unet, table, losses = train_base(cfg)
        return unet, table, {"source": "trained here", "loss_first_25": float(np.mean(losses[:25])),
                             "loss_last_25": float(np.mean(losses[-25:]))}  # fmt: skip
    path = Path(source)
    unet, table, metadata = load_base(path, cfg, sha256=cfg.get("base_sha256"))
    print(f"diffusers_ext: base UNet from {path} (made by: {metadata['command']})", flush=True)
    # the shipped base is named relative to the package, so summaries of two clones are equal
    shown = f"diffusers_ext/assets/{path.name}" if path.resolve() == SHIPPED_BASE else str(path)
    return unet, table, {"source": shown, "command": metadata["command"],
                         "loss_first_25": float(metadata["loss_first_25"]),
                         "loss_last_25": float(metadata["loss_last_25"])}  # fmt: skip


LEVER_KEYS = ("adapter_layers", "adapter_optimizer", "gradient_accumulation_steps", "bf16_adapter")


def table_title(cfg: dict) -> str:
    """The title of the demo's table: what its scores were computed on (a seeds file carries it too)."""
    return (
        f"diffusers_ext: layout control on {cfg['n_eval']} held-out layouts after {cfg['adapter_steps']} "
        "adapter steps (same noise, same frozen UNet)"
    )


def _check_levers(cfg: dict, seed: int) -> None:
    """Refuse a lever value the adapter phase cannot run, before anything loads."""
    from diffusers_ext.training.optimizers import OPTIMIZERS

    problems = []
    if cfg["adapter_optimizer"] not in OPTIMIZERS:
        problems.append(f"adapter_optimizer {cfg['adapter_optimizer']!r} (accepted: {', '.join(OPTIMIZERS)})")
    k = cfg["gradient_accumulation_steps"]
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= cfg["adapter_batch_size"]):
        problems.append(
            f"gradient_accumulation_steps {k!r} (an integer from 1 to adapter_batch_size "
            f"{cfg['adapter_batch_size']})"
        )
    if not isinstance(cfg["bf16_adapter"], bool):
        problems.append(f"bf16_adapter {cfg['bf16_adapter']!r} (true or false)")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        problems.append(f"seed {seed!r} (an integer >= 0)")
    if problems:
        raise ValueError("diffusers_ext demo: bad " + "; bad ".join(problems))


def run(
    out_dir: Path, config: dict | None = None, quick: bool = False, seed: int = DEMO_CONFIG["seed"]
) -> dict:
    """Load (or train) the base UNet, train the adapter; evaluate layout IoU against the no-adapter baseline.

    ``quick`` applies ``QUICK_CONFIG`` (fewer adapter steps, held-out layouts and sampling steps) before
    ``config``. ``seed`` is the training seed: the adapter's init, its batches, noise and timesteps
    (``python -m vlext.seeds --part diffusers_ext`` repeats the demo over it). The toy scenes, the phrase
    vectors, the frozen base and the sampling noise belong to ``config["seed"]`` and stay the same, so every
    training seed is scored on the same held-out layouts from the same noise, and the no-adapter column
    does not change with it.
    """
    import numpy as np
    import torch

    from diffusers_ext.evaluation.layout_scoring import layout_scores
    from diffusers_ext.spatial_adapter import SpatialAdapter

    unknown = sorted(set(config or {}) - set(DEMO_CONFIG))
    if unknown:
        raise ValueError(f"unknown demo config key(s) {unknown}; DEMO_CONFIG has {sorted(DEMO_CONFIG)}")
    cfg = {**DEMO_CONFIG, **(QUICK_CONFIG if quick else {}), **(config or {})}
    _check_levers(cfg, seed)
    if quick and cfg["base_unet"] is None and "base_steps" not in (config or {}):
        cfg["base_steps"] = QUICK_BASE_STEPS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the base's random init is overwritten by its weights, or trained in a fork
    started = time.perf_counter()
    unet, table, base_info = _base(cfg)
    world = _world(cfg)
    train = _dataset(world, 0, cfg["n_train"], cfg, table)
    held_out = _dataset(world, cfg["n_train"], cfg["n_eval"], cfg, table)
    print(
        f"diffusers_ext: base ready, {cfg['n_train']} training scenes, {cfg['n_eval']} held-out layouts "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    unet.requires_grad_(False)

    adapter = SpatialAdapter.for_unet(
        unet,
        phrase_dim=cfg["text_dim"],
        max_objs=cfg["max_objects"],
        hidden_dim=cfg["adapter_hidden_dim"],
        init_mode=cfg["adapter_init_mode"],
        layers=cfg["adapter_layers"],
    )
    adapter.install(unet)
    if cfg["bf16_adapter"]:
        adapter.to(torch.bfloat16)
    curve = {"step": [], "loss": [], "gate_mean": [], "gate_abs_mean": [], "out_norm": []}
    at_init = {"gate_abs_mean": adapter.gate_stats()["abs_mean"], "out_norm": _output_layer_norm(adapter)}

    def log(step, losses):
        stats = adapter.gate_stats()
        curve["step"].append(step)
        curve["loss"].append(float(np.mean(losses[-25:])))
        curve["gate_mean"].append(stats["mean"])
        curve["gate_abs_mean"].append(stats["abs_mean"])
        curve["out_norm"].append(_output_layer_norm(adapter))
        if step % (8 * cfg["log_every"]) == 0 or step == cfg["adapter_steps"] - 1:
            from tqdm.auto import tqdm

            tqdm.write(
                f"adapter step {step:4d}  loss {curve['loss'][-1]:.4f}  gate mean {stats['mean']:+.4f} "
                f"|gate| mean {stats['abs_mean']:.4f} std {stats['std']:.4f} "
                f"output-layer norm {curve['out_norm'][-1]:.4f}"
            )

    print(f"diffusers_ext: training the adapter for {cfg['adapter_steps']} steps (UNet frozen)", flush=True)
    losses = _train(
        unet,
        adapter.parameters(),
        train,
        cfg["adapter_steps"],
        cfg["adapter_lr"],
        cfg,
        adapter,
        log,
        "adapter",
        seed=seed,
    )
    adapter.float()  # sampled in fp32 like every other setting (bf16 -> fp32 is exact)

    _, context, boxes, masks, requests = held_out
    noise = torch.randn(
        len(context),
        3,
        cfg["resolution"],
        cfg["resolution"],
        generator=torch.Generator().manual_seed(cfg["seed"] + 3),
    )
    print(f"diffusers_ext: sampling {len(context)} held-out layouts with and without the adapter", flush=True)
    with_adapter = _sample(unet, adapter, context, boxes, masks, cfg, noise, "sample (adapter)")
    baseline = _sample(unet, None, context, boxes, masks, cfg, noise, "sample (no adapter)")
    ours, base = layout_scores(with_adapter, requests), layout_scores(baseline, requests)
    _grid(
        {"adapter": with_adapter[:12], "no adapter": baseline[:12]},
        requests[:12],
        out_dir / "diffusers_layout_grid.png",
    )
    _plot(curve, at_init["out_norm"], out_dir / "diffusers_gate_loss.png")
    result = {
        "gate_mean_start": curve["gate_mean"][0],
        "gate_mean_end": curve["gate_mean"][-1],
        "gate_abs_mean_start": curve["gate_abs_mean"][0],
        "gate_abs_mean_end": curve["gate_abs_mean"][-1],
        "init_mode": cfg["adapter_init_mode"],
        # the fusers' output layers (to_out, ff_out): zero at init under zero_out, like the gate under gate
        "gate_abs_mean_init": at_init["gate_abs_mean"],
        "output_layer_norm_init": at_init["out_norm"],
        "output_layer_norm_start": curve["out_norm"][0],
        "output_layer_norm_end": curve["out_norm"][-1],
        "adapter_loss_start": float(np.mean(losses[:25])),
        "adapter_loss_end": float(np.mean(losses[-25:])),
        "mean_iou_adapter": ours["mean_iou"],
        "mean_iou_baseline": base["mean_iou"],
        "share_iou_gt_0.5_adapter": ours["share_iou_gt_0.5"],
        "share_iou_gt_0.5_baseline": base["share_iou_gt_0.5"],
        "share_center_in_box_adapter": ours["share_center_in_box"],
        "share_center_in_box_baseline": base["share_center_in_box"],
        "n_objects": ours["n_objects"],
        "adapter_steps": cfg["adapter_steps"],
        "training_seed": seed,
        "adapter_parameters": sum(p.numel() for p in adapter.parameters()),
        "fusers": len(adapter.layer_names),
        "levers": {k: cfg[k] for k in LEVER_KEYS},
        "base": base_info,
        "seconds": time.perf_counter() - started,
    }
    rows = [
        [f"mean IoU with the requested box ({ours['n_objects']} objects)", ours["mean_iou"], base["mean_iou"]],
        ["share of objects with IoU > 0.5", ours["share_iou_gt_0.5"], base["share_iou_gt_0.5"]],
        ["share of objects whose centre lies in the box", ours["share_center_in_box"], base["share_center_in_box"]],
    ]  # fmt: skip
    rows = [[label, round(a, 3), round(b, 3)] for label, a, b in rows]
    result["tables"] = [
        {
            "title": table_title(cfg),
            "columns": ["score", "adapter", "no adapter"],
            "rows": rows,
        }
    ]
    result["figures"] = [
        {
            "file": "diffusers_layout_grid.png",
            "caption": "held-out layouts, requested boxes drawn; top row with the adapter, bottom row without",
        },
        {"file": "diffusers_gate_loss.png", "caption": "adapter phase: loss, gates and output-layer norm"},
    ]
    atomic_write_json(out_dir / "diffusers_demo.json", result, indent=2)
    for label, a, b in rows:
        print(f"{label:>50}: adapter {a:.3f}  no adapter {b:.3f}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument(
        "--init-mode",
        choices=("zero_out", "gate"),
        default=DEMO_CONFIG["adapter_init_mode"],
        help="adapter init: zero_out (output layers 0, gate tanh(1)) or gate (GLIGEN: gate 0)",
    )
    parser.add_argument("--adapter-steps", type=int, default=DEMO_CONFIG["adapter_steps"])
    parser.add_argument(
        "--seed",
        type=int,
        default=DEMO_CONFIG["seed"],
        help="training seed of the adapter phase (default %(default)s, as in make demo); the toy scenes, the "
        "shipped base and the sampling noise stay the same",
    )
    parser.add_argument(
        "--train-base",
        type=Path,
        metavar="FILE",
        help="only train the base UNet (phase 1) with the default config and write it to FILE (safetensors)",
    )
    parser.add_argument(
        "--base-unet",
        type=Path,
        metavar="FILE",
        help="skip phase 1: load the frozen base from FILE (written by --train-base) and train only the adapter",
    )
    args = parser.parse_args(argv)
    if args.base_unet is not None and not args.base_unet.is_file():
        parser.error(f"--base-unet {args.base_unet}: no such file; write one with --train-base FILE")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.train_base is not None:
        cfg = dict(DEMO_CONFIG)
        unet, table, losses = train_base(cfg)
        save_base(args.train_base, unet, table, cfg, losses)
        print(f"wrote {args.train_base} (sha256 {_sha256(args.train_base)})")
        return
    if args.adapter_steps < 1:
        parser.error(f"--adapter-steps must be >= 1, got {args.adapter_steps}")
    run(
        args.out,
        {
            "adapter_init_mode": args.init_mode,
            "adapter_steps": args.adapter_steps,
            "base_unet": args.base_unet if args.base_unet is not None else DEMO_CONFIG["base_unet"],
            "base_sha256": None if args.base_unet is not None else DEMO_CONFIG["base_sha256"],
        },
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
