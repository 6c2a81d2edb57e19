"""ShapeNetPart part segmentation in its ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` layout.

    <root>/synsetoffset2category.txt                         "<Category>\\t<synset>" per line
    <root>/train_test_split/shuffled_{train,val,test}_file_list.json   ["shape_data/<synset>/<id>", ...]
    <root>/<synset>/<id>.txt                                 "x y z nx ny nz part" per line

Part labels in the files are global (0..49, categories in the original's order); they become part
indices within the object's category. As the original: each shape is centred on its bounding box
and scaled into the unit sphere, y and z are swapped (z up), "train" is the official train + val
lists, "test" the test list; every shape is grid-subsampled (normals averaged, part labels voted)
and cached. ``category="multi"`` keeps all categories (task "multi_segmentation", label = category
index); a category name keeps that one (task "segmentation", label 0).
"""

from __future__ import annotations

import json

import numpy as np

from training.datasets.base import DatasetError, ObjectCloud, ObjectDataset, require_dir, skip_empty
from training.datasets.common import (
    SplitReads,
    cache_file,
    check_bad_file_policy,
    check_split,
    load_or_build,
    read_table,
    subsample,
)

# The original's categories and part counts; the files number parts globally in this order.
CATEGORIES = [
    "Airplane",
    "Bag",
    "Cap",
    "Car",
    "Chair",
    "Earphone",
    "Guitar",
    "Knife",
    "Lamp",
    "Laptop",
    "Motorbike",
    "Mug",
    "Pistol",
    "Rocket",
    "Skateboard",
    "Table",
]
NUM_PARTS = [4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3]
PART_OFFSETS = np.concatenate([[0], np.cumsum(NUM_PARTS)[:-1]]).astype(int)
COLUMNS = ("x", "y", "z", "normal_x", "normal_y", "normal_z", "part")

LAYOUT = (
    "<root>/synsetoffset2category.txt, <root>/train_test_split/shuffled_{train,val,test}_file_list.json, "
    "<root>/<synset>/<id>.txt with 'x y z nx ny nz part' lines"
)
SPLIT_LISTS = {"train": ("train", "val"), "test": ("test",)}


class ShapeNetPart(ObjectDataset):
    """ShapeNetPart, one category or all ("multi"); splits "train" and "test"."""

    name = "ShapeNetPart"
    version = 1

    def __init__(
        self, root, first_subsampling_dl: float = 0.02, category: str = "multi", on_bad_file: str = "error"
    ):
        if not first_subsampling_dl > 0:
            raise ValueError(f"first_subsampling_dl must be > 0, got {first_subsampling_dl}")
        check_bad_file_policy(on_bad_file)
        self.on_bad_file = on_bad_file
        self.root = require_dir(root, LAYOUT)
        self.dl = float(first_subsampling_dl)
        by_lower = {c.lower(): c for c in CATEGORIES}
        if category.lower() == "multi":
            self.category = "multi"
            self.task = "multi_segmentation"
            self.label_names = list(CATEGORIES)
            self.num_parts = list(NUM_PARTS)
        elif category.lower() in by_lower:
            self.category = by_lower[category.lower()]
            self.task = "segmentation"
            self.label_names = [self.category]
            self.num_parts = [NUM_PARTS[CATEGORIES.index(self.category)]]
        else:
            raise ValueError(f"category must be 'multi' or one of {CATEGORIES}, got {category!r}")
        self.synsets = self._read_synsets()
        self._clouds: dict[str, list[ObjectCloud]] = {}

    def cache_identity(self):
        """What tells this dataset from another of the same name (keys the pipeline's calibration)."""
        return {"root": str(self.root.resolve()), "category": self.category}

    def _read_synsets(self) -> dict[str, str]:
        path = self.root / "synsetoffset2category.txt"
        if not path.is_file():
            raise DatasetError(f"missing file {str(path)!r}; expected layout: {LAYOUT}")
        synsets = {}
        with open(path) as f:
            for number, line in enumerate(f, 1):
                words = line.split()
                if not words:
                    continue
                if len(words) != 2 or words[0] not in CATEGORIES:
                    raise DatasetError(
                        f"{path}: line {number} must be '<Category> <synset>' with a category "
                        f"among {CATEGORIES}: {line.strip()!r}"
                    )
                synsets[words[1]] = words[0]
        return synsets

    def clouds(self, split: str) -> list[ObjectCloud]:
        check_split(split, ("train", "test"))
        if split not in self._clouds:
            path = cache_file(
                self.name, split, self.dl, {"root": str(self.root.resolve()), "version": self.version}
            )
            reads = SplitReads(self.on_bad_file, split)
            arrays = load_or_build(path, lambda: self._build(split, reads), reads)
            reads.finish(len(arrays["names"]))
            bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
            clouds = []
            for a, b, category, name in zip(bounds[:-1], bounds[1:], arrays["categories"], arrays["names"]):
                if self.category != "multi" and CATEGORIES[category] != self.category:
                    continue
                label = int(category) if self.category == "multi" else 0
                clouds.append(
                    ObjectCloud(
                        points=arrays["points"][a:b],
                        normals=arrays["normals"][a:b],
                        label=label,
                        point_labels=arrays["parts"][a:b],
                        name=str(name),
                    )
                )
            self._clouds[split] = clouds
        return self._clouds[split]

    def _shape_list(self, which: str) -> list[str]:
        path = self.root / "train_test_split" / f"shuffled_{which}_file_list.json"
        if not path.is_file():
            raise DatasetError(f"missing file {str(path)!r}; expected layout: {LAYOUT}")
        try:
            with open(path) as f:
                entries = json.load(f)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise DatasetError(f"{path}: must be a JSON list of 'shape_data/<synset>/<id>' strings")
        # Entries are "shape_data/<synset>/<id>": keep "<synset>/<id>".
        return ["/".join(e.split("/")[-2:]) for e in entries]

    def _read_shape(self, which: str, shape: str):
        """(category index, float32 [n, 7] table with part indices within the category) of one shape."""
        synset = shape.split("/")[0]
        if synset not in self.synsets:
            raise DatasetError(
                f"shape {shape!r} of shuffled_{which}_file_list.json has synset {synset!r}, "
                f"absent from synsetoffset2category.txt"
            )
        category = CATEGORIES.index(self.synsets[synset])
        path = self.root / f"{shape}.txt"
        data = read_table(path, 7, names=COLUMNS)
        part = data[:, 6] - PART_OFFSETS[category]
        if len(data) and (
            np.any(part != np.round(part)) or part.min() < 0 or part.max() >= NUM_PARTS[category]
        ):
            raise DatasetError(
                f"{path}: part labels must be integers in [{PART_OFFSETS[category]}, "
                f"{PART_OFFSETS[category] + NUM_PARTS[category]}) for "
                f"{CATEGORIES[category]}"
            )
        data[:, 6] = part
        return category, data

    def _build(self, split: str, reads: SplitReads) -> dict[str, np.ndarray]:
        points, normals, parts, categories, names = [], [], [], [], []
        for which in SPLIT_LISTS[split]:
            for shape in self._shape_list(which):
                read = reads.read(self._read_shape, which, shape)
                if read is None or skip_empty(shape, read[1]):
                    continue
                category, data = read
                part = data[:, 6].astype(np.int64)
                xyz = data[:, :3].astype(np.float64)
                xyz -= (xyz.min(0) + xyz.max(0)) / 2
                scale = np.max(np.linalg.norm(xyz, axis=1))
                if scale > 0:
                    xyz /= scale
                swap = [0, 2, 1]
                sub_points, sub_normals, sub_parts = subsample(
                    xyz[:, swap], self.dl, features=data[:, 3:6][:, swap], labels=part
                )
                points.append(sub_points)
                normals.append(sub_normals)
                parts.append(sub_parts)
                categories.append(category)
                names.append(shape)
        empty3 = np.zeros((0, 3), np.float32)
        return {
            "points": np.concatenate(points) if points else empty3,
            "normals": np.concatenate(normals) if normals else empty3,
            "parts": np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32),
            "lengths": np.array([len(p) for p in points], np.int64),
            "categories": np.array(categories, np.int32),
            "names": np.array(names, dtype=str),
        }


def from_config(config) -> ShapeNetPart:
    """ShapeNetPart at ``config.dataset.path``; the category is ``dataset.extra['category']`` or
    ``dataset.split`` (default "multi")."""
    extra = dict(config.dataset.extra or {})
    category = extra.get("category") or config.dataset.split or "multi"
    return ShapeNetPart(
        config.dataset.path,
        config.model.first_subsampling_dl,
        category=category,
        on_bad_file=config.dataset.on_bad_file,
    )
