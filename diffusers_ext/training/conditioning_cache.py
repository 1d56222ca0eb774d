"""Cached conditioning for adapter training (``--cache-dir``): prompt and phrase embeddings, VAE latents.

The frozen encoders give the same output for the same input every step, so the trainer computes them once,
as diffusers' SDXL training scripts and the field's fine-tuning tools do, and then trains without the text
encoders (and, with ``--cache-latents``, without the VAE) on the accelerator. On Kolors that leaves
ChatGLM3-6B (about 12.5 GB in bf16) off every GPU.

Layout: ``<cache-dir>/<kind>/<key[:2]>/<key>.safetensors`` with kind ``prompt`` (``prompt_embeds`` and, for
SDXL/Kolors, ``pooled``), ``phrase`` (``feature``) and ``latent`` (``mean``, ``std`` of the VAE's latent
distribution; the per-step sample is still drawn from the step's generator). The key is the SHA-256 of
everything that determines the entry, stored again in the file's metadata and compared on read:

- prompt/phrase: the model folder (a hub id is resolved to its snapshot folder, whose name is the
  revision), a fingerprint of the text encoders' and tokenizers' files (config contents, weight sizes
  and modification times), the pipeline kind, the dtype, and the text;
- latent: the VAE's fingerprint, the dtype, the image path and the SHA-256 of its bytes, the resolution,
  the crop mode and geometry and the flip. A centre (or no) crop is fixed per image, so both orientations
  are cached when ``--random-flip`` is on; a random crop cannot be cached (refused before work starts).

A changed caption, phrase or image file gets a new key, so exactly its entries are recomputed. Entries are
written as databases write them: a temporary name in the same folder, fsync, atomic rename; a reader only
opens final names, and a file whose header, metadata or size does not match its key is treated as absent
and rewritten (with a warning), so a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from vlext.atomic_files import atomic_write_bytes

__all__ = ["ConditioningCache", "component_fingerprint", "fill_cache", "model_folder"]

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def model_folder(name_or_path: str) -> Path:
    """The local folder of ``--pretrained-model``: the path itself, or the hub snapshot (its revision)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, local_files_only=True)).resolve()


def component_fingerprint(folder: Path, components) -> str:
    """SHA-256 over the components' files: JSON/text contents, and (size, mtime) of everything else."""
    h = hashlib.sha256()
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        for f in sorted(p for p in sub.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(folder)).encode())
            if f.suffix in (".json", ".txt") and f.stat().st_size < 1 << 20:
                h.update(f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ConditioningCache:
    """Content-keyed safetensors entries under ``root`` (picklable: the loader's workers read it)."""

    def __init__(
        self,
        root,
        *,
        model: Path,
        kind: str,
        dtype: str,
        cache_latents: bool,
        resolution: int,
        crop: str,
        latent_dtype: str | None = None,
    ):
        self.root = Path(root)
        text_id = component_fingerprint(model, TEXT_COMPONENTS)
        self.identity = {
            "prompt": {"model": str(model), "text_encoders": text_id, "kind": kind, "dtype": dtype},
            "phrase": {"model": str(model), "text_encoders": text_id, "kind": kind, "dtype": dtype},
            "latent": {
                "model": str(model),
                "vae": component_fingerprint(model, ("vae",)),
                "dtype": latent_dtype or dtype,
                "resolution": resolution,
                "crop": crop,
            },
        }
        self.cache_latents = cache_latents
        self.written = 0  # entries computed and written by this process
        self.rewritten_bad = 0

    def _content(self, kind: str, content: dict) -> tuple[Path, str]:
        text = json.dumps(
            {"kind": kind, **self.identity[kind], **content}, sort_keys=True, ensure_ascii=False
        )
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.root / kind / key[:2] / f"{key}.safetensors", text

    def _check(self, path: Path, text: str) -> None:
        """Raise unless ``path`` is a whole safetensors file for ``text``: its header parses, its metadata is
        the key's content and its size is the header's size plus the end of the last tensor. Reads the
        header only, so the cache pass checks every entry without loading the tensors."""
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if header.get("__metadata__", {}).get("content") != text:
            raise ValueError("its metadata does not match the key")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            raise ValueError(f"{size} bytes, the header describes {8 + n + end}")

    def _whole(self, path: Path, text: str) -> bool:
        if not path.is_file():
            return False
        try:
            self._check(path, text)
            return True
        except Exception as e:  # damaged outside the trainer: ours are renamed only when complete
            warnings.warn(f"conditioning cache: {path} is unreadable ({e}); computing it again", stacklevel=3)
            self.rewritten_bad += 1
            return False

    def has(self, kind: str, content: dict) -> bool:
        return self._whole(*self._content(kind, content))

    def read(self, kind: str, content: dict) -> dict | None:
        path, text = self._content(kind, content)
        if not self._whole(path, text):
            return None
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def write(self, kind: str, content: dict, tensors: dict) -> None:
        path, text = self._content(kind, content)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"content": text}
        )
        atomic_write_bytes(path, data)
        self.written += 1

    @staticmethod
    def latent_content(row: dict, plan) -> dict:
        return {
            "image": row["image"],
            "sha256": row["sha256"],
            "resized": list(plan.resized),
            "top_left": [plan.top, plan.left],
            "flip": plan.flip,
        }

    def _need(self, kind: str, content: dict) -> dict:
        found = self.read(kind, content)
        if found is None:
            raise RuntimeError(
                f"conditioning cache {self.root}: no {kind} entry for {content}; the cache pass should have "
                "written it (was the cache folder changed during training?)"
            )
        return found

    def sample_conditioning(self, row: dict, phrases: list[str], plan) -> dict:
        """A sample's cached prompt embedding (+ pooled), phrase features and, if cached, latents."""
        prompt = self._need("prompt", {"text": row["caption"]})
        out = {"prompt_embeds": prompt["prompt_embeds"]}
        if "pooled" in prompt:
            out["pooled"] = prompt["pooled"]
        feats = [self._need("phrase", {"text": p})["feature"] for p in phrases]
        out["phrase_feats"] = torch.stack(feats) if feats else None
        if self.cache_latents:
            latent = self._need("latent", self.latent_content(row, plan))
            out["latent_mean"], out["latent_std"] = latent["mean"], latent["std"]
        return out


def _encode_prompts(pipe, kind: str, texts: list[str], device) -> list[dict]:
    with torch.no_grad():
        if kind == "sd":
            embeds, _ = pipe.encode_prompt(texts, device, 1, False)
            return [{"prompt_embeds": e} for e in embeds]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return [{"prompt_embeds": e, "pooled": p} for e, p in zip(embeds, pooled, strict=True)]


def fill_cache(
    cache: ConditioningCache,
    pipe,
    kind: str,
    dataset,
    *,
    device,
    dtype,
    rank=0,
    world=1,
    progress=True,
    batch_size=4,
    text_batch_size=16,
    encoders=None,
) -> dict:
    """Compute the missing entries of this rank's share (every ``world``-th one): the empty prompt, every
    caption and phrase of ``dataset.rows`` and, with latents, every image in each orientation its crop can
    take. Entries that exist are skipped, so an interrupted pass resumes where it stopped.

    ``encoders(names)`` returns a context manager that holds the named modules on ``device`` while the block
    runs (the trainer passes :func:`~diffusers_ext.training.placement.encoders_on_device`): the text
    encoders are on the device only while the prompts and phrases are encoded, the VAE only while the images
    are, never together. ``dtype`` is the VAE's input dtype; images go through it ``batch_size`` at a time
    (``--cache-batch-size``: VAE activations at 1024 px are about 2.5 GiB per image in fp32), texts
    ``text_batch_size`` at a time. Returns counts of this rank's share: entries, found, written."""
    import contextlib

    from tqdm.auto import tqdm

    from diffusers_ext.generation import encode_phrases
    from diffusers_ext.training.dataset import _transform, to_unit_range

    if encoders is None:
        encoders = lambda names: contextlib.nullcontext()  # noqa: E731  (modules already placed)
    captions = sorted({"", *(r["caption"] for r in dataset.rows)})
    phrases = sorted({p for r in dataset.rows for p in r["phrases"]})
    jobs = [("prompt", {"text": t}, t) for t in captions] + [("phrase", {"text": p}, p) for p in phrases]
    if cache.cache_latents:
        flips = (False, True) if dataset.flip else (False,)
        for i, row in enumerate(dataset.rows):
            base = replace(dataset.plan(0, i), flip=False)
            for f in flips:
                plan = replace(base, flip=f)
                jobs.append(("latent", cache.latent_content(row, plan), (row, plan)))
    # a fixed share per rank, checked by that rank only: ranks that check while others write still
    # split the work without gaps
    share = jobs[rank::world]
    mine = [j for j in share if not cache.has(j[0], j[1])]
    counts = {"entries": len(share), "found": len(share) - len(mine), "written": 0}
    if not mine:
        return counts
    bar = tqdm(total=len(mine), desc="caching conditioning", disable=not progress)

    def run(todo, size, encode):
        for s in range(0, len(todo), size):
            chunk = todo[s : s + size]
            for (k, content, _), tensors in zip(chunk, encode(chunk), strict=True):
                cache.write(k, content, tensors)
            counts["written"] += len(chunk)
            bar.update(len(chunk))

    def encode_latents(chunk):
        pixels = torch.stack(
            [_transform_row(dataset, row, plan, _transform) for row, plan in (j[2] for j in chunk)]
        )
        with torch.no_grad():
            dist = pipe.vae.encode(to_unit_range(pixels.to(device)).to(dtype)).latent_dist
        return [{"mean": m, "std": sd} for m, sd in zip(dist.mean, dist.std, strict=True)]

    text_jobs = [j for j in mine if j[0] != "latent"]
    if text_jobs:
        with encoders(("text_encoder", "text_encoder_2")):
            run(
                [j for j in text_jobs if j[0] == "prompt"],
                text_batch_size,
                lambda chunk: _encode_prompts(pipe, kind, [j[2] for j in chunk], device),
            )
            run(
                [j for j in text_jobs if j[0] == "phrase"],
                text_batch_size,
                lambda chunk: [{"feature": f} for f in encode_phrases(pipe, [j[2] for j in chunk])],
            )
    latent_jobs = [j for j in mine if j[0] == "latent"]
    if latent_jobs:
        with encoders(("vae",)):
            run(latent_jobs, batch_size, encode_latents)
    bar.close()
    return counts


def _transform_row(dataset, row, plan, transform):
    from vlext.images import load_image

    return transform(load_image(dataset.image_dir / row["image"]), plan, dataset.resolution)
