"""LAVIS dataset builders ``cirr`` and ``fashioniq`` reading the official layouts from a local root.

CIRR and FashionIQ cannot be downloaded automatically (licences, dead image URLs), so unlike LAVIS's
builders these never download: ``build_info.root`` must point at the data (SPRC's ``cirr_dataset`` /
``fashionIQ_dataset`` folder). Splits are LAVIS's ``train``/``val``/``test``.
"""

from __future__ import annotations

from pathlib import Path

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_ext.datasets.cir_datasets import (
    CirEvalDataset,
    CirTrainDataset,
    read_cirr,
    read_fashioniq_galleries,
)

__all__ = ["CirrBuilder", "FashionIQBuilder"]

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "datasets"


class _CirBuilder(BaseDatasetBuilder):
    kind = ""
    split_names: dict[str, str] = {}

    def _read(self, root, split):
        raise NotImplementedError

    def build_datasets(self):
        build_info = self.config.build_info
        root = build_info.get("root")
        if not root or not Path(root).is_dir():
            raise FileNotFoundError(
                f"{self.kind}: build_info.root must be an existing folder with the {self.kind} layout, got {root!r}"
            )
        self.build_processors()
        datasets = {}
        for split in build_info.get("splits", ["train", "val", "test"]):
            if split not in self.split_names:
                raise ValueError(
                    f"{self.kind}: unknown split {split!r}; accepted: {sorted(self.split_names)}"
                )
            triplets, paths, galleries = self._read(root, self.split_names[split])
            if split == "train":
                datasets[split] = CirTrainDataset(
                    triplets, paths, self.vis_processors["train"], self.text_processors["train"]
                )
            else:
                datasets[split] = CirEvalDataset(
                    triplets,
                    paths,
                    self.vis_processors["eval"],
                    self.text_processors["eval"],
                    self.kind,
                    galleries=galleries,
                )
        return datasets

    @classmethod
    def default_config_path(cls, type="default"):
        return str(_CONFIG_DIR / cls.kind / f"{type}.yaml")


@registry.register_builder("cirr")
class CirrBuilder(_CirBuilder):
    kind = "cirr"
    split_names = {"train": "train", "val": "val", "test": "test1"}
    DATASET_CONFIG_DICT = {"default": str(_CONFIG_DIR / "cirr" / "default.yaml")}

    def _read(self, root, split):
        return (*read_cirr(root, split), None)


@registry.register_builder("fashioniq")
class FashionIQBuilder(_CirBuilder):
    kind = "fashioniq"
    split_names = {"train": "train", "val": "val", "test": "test"}
    DATASET_CONFIG_DICT = {"default": str(_CONFIG_DIR / "fashioniq" / "default.yaml")}

    def _read(self, root, split):
        """Triplets, paths and each category's own gallery (ranked per category, as SPRC does)."""
        return read_fashioniq_galleries(
            root, split, self.config.build_info.get("categories", ("dress", "shirt", "toptee"))
        )
