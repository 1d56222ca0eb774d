"""One detector interface for layout evaluation: find each requested phrase in a generated image.

Layout control is scored the way GLIGEN and its successors score it (the "oracle" evaluation): generate
from ground-truth boxes, detect every requested object, compare boxes. Two kinds of detector plug in:

- ``ToyColourDetector``: the toy world's colour locator (``vlext.toyworld.locate``). Every toy-world
  object has a distinct palette colour, named in its phrase ("a large red circle", "一个大的红色圆形"), so
  colour segmentation finds it exactly; no model is needed.
- ``ZeroShotDetector``: open-vocabulary detectors through transformers'
  ``AutoModelForZeroShotObjectDetection`` and ``AutoProcessor``: OWLv2 (Minderer et al., 2023) and
  Grounding DINO (Liu et al., 2023), or any local folder of either family.

Both return, per image and per requested phrase, candidate boxes (xyxy, normalized to the image) with a
score; ``diffusers_ext.evaluation.layout_scoring`` matches each object to the best-scoring candidate of its own
phrase. ``load_detector(spec)`` turns the ``--detector`` flag into a detector, refusing a folder that is
not a detector before anything is generated.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DETECTOR_NAMES",
    "Detection",
    "Detector",
    "ToyColourDetector",
    "ZeroShotDetector",
    "load_detector",
]

# --detector names -> what they load. The zero-shot ones are the published checkpoints on the hub.
DETECTOR_NAMES = {
    "owlv2": "google/owlv2-base-patch16-ensemble",
    "grounding-dino": "IDEA-Research/grounding-dino-tiny",
    "toy-colour": None,
}
# candidates kept per phrase: enough for box AP (COCO ranks up to 100 detections per image) and for
# layouts that repeat a phrase ("a dog" twice), few enough to keep the per-image records small
TOP_K = 10


@dataclass(frozen=True)
class Detection:
    """A candidate box for phrase ``phrase_index`` of its image: xyxy normalized to [0, 1], and a score."""

    box: tuple[float, float, float, float]
    score: float
    phrase_index: int

    def as_dict(self) -> dict:
        return {
            "box": [round(v, 6) for v in self.box],
            "score": round(self.score, 6),
            "phrase": self.phrase_index,
        }


class Detector:
    """``detect(images, phrases_per_image)`` -> per image a list of ``Detection`` (any order, several per
    phrase allowed, none when a phrase is not found). ``name`` goes into the results."""

    name: str = "detector"

    def detect(self, images: Sequence, phrases_per_image: Sequence[Sequence[str]]) -> list[list[Detection]]:
        raise NotImplementedError

    def check_phrases(self, phrases: Sequence[str], where: str) -> None:
        """Raise before any generation if this detector cannot read a phrase (default: accepts all)."""


def _check_batch(images, phrases_per_image) -> None:
    if len(images) != len(phrases_per_image):
        raise ValueError(
            f"{len(images)} images but {len(phrases_per_image)} phrase lists; give one list of phrases per image"
        )


class ToyColourDetector(Detector):
    """The toy world's colour locator behind the detector interface: a phrase's object is the largest
    region of the palette colour its phrase names (English or Chinese colour word). Colour segmentation has
    no confidence, so a found object scores 1.0; a colour not found gives no detection."""

    name = "toy-colour"

    def __init__(self):
        from vlext.toyworld.palette import COLORS, COLORS_ZH

        # longest words first so that no colour name hides inside another
        words = [(w, w) for w in COLORS] + [(zh, en) for en, zh in COLORS_ZH.items()]
        self._words = sorted(words, key=lambda w: -len(w[0]))

    def colour_of(self, phrase: str) -> str | None:
        text = phrase.lower()
        found = {en for word, en in self._words if re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text)}
        return next(iter(found)) if len(found) == 1 else None

    def check_phrases(self, phrases: Sequence[str], where: str) -> None:
        for phrase in phrases:
            if self.colour_of(phrase) is None:
                raise ValueError(
                    f"{where}: the toy-colour detector needs exactly one toy-world colour word in each phrase "
                    f"(red, orange, yellow, green, cyan, blue, purple or 红色 ...), got {phrase!r}; use a "
                    "zero-shot detector (--detector owlv2) for other images"
                )

    def detect(self, images, phrases_per_image):
        from vlext.toyworld import locate

        _check_batch(images, phrases_per_image)
        out = []
        for image, phrases in zip(images, phrases_per_image, strict=True):
            self.check_phrases(phrases, "toy-colour detector")
            found = []
            for k, phrase in enumerate(phrases):
                box = locate(image, self.colour_of(phrase))
                if box is not None:
                    found.append(Detection(tuple(box), 1.0, k))
            out.append(found)
        return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


class ZeroShotDetector(Detector):
    """An open-vocabulary detector from transformers (``AutoModelForZeroShotObjectDetection``).

    Per phrase it keeps the ``top_k`` best-scoring boxes. OWL-ViT/OWLv2 score every image patch against
    every text query (``logits`` (batch, patches, queries)); their boxes are mapped back to the image by the
    processor's own post-processing, which knows OWLv2's square padding. Grounding DINO scores each query
    box against each text token; a phrase's score is the maximum over its own tokens (the tokens of the
    phrase in the "a cat. a dog." prompt the processor builds).
    """

    def __init__(self, model, processor, name: str, device: str = "cpu", top_k: int = TOP_K):
        self.model = model.eval().to(device)
        self.processor = processor
        self.name = name
        self.device = device
        self.top_k = top_k
        self.family = "grounding-dino" if "grounding" in model.config.model_type else "owl"
        self._warned: set[str] = set()

    def check_phrases(self, phrases, where):
        cjk = [p for p in phrases if _CJK.search(p)]
        if cjk:
            raise ValueError(
                f"{where}: phrase {cjk[0]!r} is not English, and {self.name}'s text encoder reads English only "
                "(its detections would be meaningless). Give each object an English phrase in the row's "
                '"phrases_en" list (parallel to "phrases"), or pass --allow-non-english-detector-phrases for a '
                "multilingual detector"
            )

    def detect(self, images, phrases_per_image):
        import torch

        _check_batch(images, phrases_per_image)
        images = [im.convert("RGB") for im in images]
        with torch.no_grad():
            if self.family == "owl":
                return self._detect_owl(images, phrases_per_image)
            return [
                self._detect_grounding_dino(im, ps) for im, ps in zip(images, phrases_per_image, strict=True)
            ]

    def _warn_long(self, phrases) -> None:
        """OWL's text encoder reads 16 tokens; a longer phrase is cut there (with a warning, never silently)."""
        tokenizer = self.processor.tokenizer
        limit = tokenizer.model_max_length
        for phrase in phrases:
            if phrase not in self._warned and len(tokenizer(phrase).input_ids) > limit:
                self._warned.add(phrase)
                warnings.warn(
                    f"detector phrase {phrase!r} is longer than {self.name}'s {limit} text tokens; the detector "
                    "reads its first tokens only (give a shorter English phrase in phrases_en)",
                    stacklevel=3,
                )

    def _detect_owl(self, images, phrases_per_image):
        self._warn_long([p for ps in phrases_per_image for p in ps])
        inputs = self.processor(
            text=[list(p) for p in phrases_per_image], images=images, truncation=True, return_tensors="pt"
        )
        outputs = self.model(**inputs.to(self.device))
        sizes = [(im.height, im.width) for im in images]
        out = []
        for i, phrases in enumerate(phrases_per_image):
            found = []
            for k in range(len(phrases)):
                # one phrase at a time through the processor's post-processing: it converts and unpads the
                # boxes for this model family; threshold -1 keeps every patch's box with its score
                single = _Outputs(
                    logits=outputs.logits[i : i + 1, :, k : k + 1], pred_boxes=outputs.pred_boxes[i : i + 1]
                )
                res = self.processor.image_processor.post_process_object_detection(
                    single, threshold=-1.0, target_sizes=[sizes[i]]
                )[0]
                found += _top(res["scores"], res["boxes"], sizes[i], k, self.top_k)
            out.append(found)
        return out

    def _detect_grounding_dino(self, image, phrases):
        import torch

        labels = [p.strip().lower() for p in phrases]
        # the prompt Grounding DINO's processor builds from a label list, with the character span of each
        # label so that its tokens can be found through the fast tokenizer's offsets
        text, spans, pos = "", [], 0
        for label in labels:
            spans.append((pos, pos + len(label)))
            text += label + ". "
            pos = len(text)
        text = text.strip()
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        outputs = self.model(**inputs.to(self.device))
        probs = outputs.logits[0].sigmoid()  # (queries, text tokens)
        boxes = outputs.pred_boxes[0]  # (queries, 4) cx, cy, w, h normalized to the image
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
        found = []
        for k, (start, end) in enumerate(spans):
            tokens = [
                t
                for t, (a, b) in enumerate(offsets)
                if b > a and a >= start and b <= end and t < probs.shape[1]
            ]
            if not tokens:
                raise ValueError(f"phrase {phrases[k]!r} has no tokens in {self.name}'s tokenizer")
            scores = probs[:, tokens].max(dim=1).values
            found += _top(scores, xyxy, None, k, self.top_k)
        return found


@dataclass
class _Outputs:
    logits: object
    pred_boxes: object


def _top(scores, boxes, size, phrase_index: int, k: int) -> list[Detection]:
    """The ``k`` best (score, box) pairs as Detections; boxes in pixels when ``size`` (h, w) is given."""
    order = scores.argsort(descending=True)[:k]
    found = []
    for j in order.tolist():
        box = boxes[j].tolist()
        if size is not None:
            h, w = size
            box = [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
        box = tuple(min(max(float(v), 0.0), 1.0) for v in box)
        found.append(Detection(box, float(scores[j]), phrase_index))
    return found


def _folder_model_type(folder: Path) -> str:
    """The model type a folder's ``config.json`` names, or a clear error when it is not a detector."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES

    accepted = ", ".join(sorted(MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES))
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(
            f"--detector {folder}: no config.json in this folder, so it is not a transformers model folder; "
            f"accepted: a zero-shot object detector saved with save_pretrained (model types: {accepted}), or "
            f"one of the names {', '.join(DETECTOR_NAMES)}"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"--detector {folder}: config.json is not a JSON object ({e})") from None
    if model_type not in MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES:
        raise ValueError(
            f"--detector {folder}: model_type {model_type!r} is not a zero-shot object detector; accepted model "
            f"types: {accepted}"
        )
    return model_type


def load_detector(spec: str, device: str = "cpu", top_k: int = TOP_K) -> Detector:
    """``--detector`` value -> Detector: ``toy-colour``, ``owlv2``, ``grounding-dino``, a local folder, or a
    hub id. Loading happens here, so a wrong folder or missing weights fail before any generation."""
    if spec == "toy-colour":
        return ToyColourDetector()
    path = Path(spec).expanduser()
    if spec in DETECTOR_NAMES:
        source, name = DETECTOR_NAMES[spec], spec
    elif path.is_dir():
        _folder_model_type(path)
        source, name = str(path), str(spec)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        source, name = spec, spec
    else:
        raise ValueError(
            f"--detector {spec!r} is neither a folder nor one of {', '.join(DETECTOR_NAMES)}; accepted: "
            "toy-colour, owlv2, grounding-dino, a local folder of a transformers zero-shot object detector, "
            "or a hub id such as google/owlv2-base-patch16-ensemble"
        )
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "TRANSFORMERS_OFFLINE", ""
        ) not in ("", "0")
        raise FileNotFoundError(
            f"--detector {spec}: could not load {source} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            + ("HF_HUB_OFFLINE is set, so nothing is downloaded. " if offline else "")
            + f"Download it once where the network is reachable, e.g. `hf download {source} --local-dir "
            f"models/{source.split('/')[-1]}`, then pass --detector models/{source.split('/')[-1]} "
            "(see docs/layout_evaluation.md)"
        ) from None
    return ZeroShotDetector(model, processor, name=name, device=device, top_k=top_k)
