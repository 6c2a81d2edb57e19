"""Dataset registry: ``load_dataset(config)`` builds the dataset named by ``config.dataset.name``.

Each entry is ``module:function`` taking the config; modules are imported on demand so that one
dataset's optional needs never affect another.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "ModelNet40": "training.datasets.modelnet40:from_config",
    "ShapeNetPart": "training.datasets.shapenetpart:from_config",
    "S3DIS": "training.datasets.s3dis:from_config",
    "Scannet": "training.datasets.scannet:from_config",
    "Semantic3D": "training.datasets.semantic3d:from_config",
    "NPM3D": "training.datasets.npm3d:from_config",
    "PointCloudFolder": "training.datasets.point_cloud_folder:from_config",
    "EmbeddedShapes": "training.datasets.embedded_shapes:shapes_from_config",
    "EmbeddedParts": "training.datasets.embedded_shapes:parts_from_config",
    "EmbeddedRooms": "training.datasets.embedded_rooms:EmbeddedRooms.from_config",
    "EmbeddedLidarObjects": "training.datasets.embedded_lidar:from_config",
}


def load_dataset(config):
    """The dataset of ``config.dataset.name`` (an ObjectDataset or SceneDataset)."""
    name = config.dataset.name
    if name not in REGISTRY:
        raise ValueError(f"dataset.name {name!r} is unknown; known: {sorted(REGISTRY)}")
    module, attribute = REGISTRY[name].split(":")
    factory = importlib.import_module(module)
    for part in attribute.split("."):
        factory = getattr(factory, part)
    return factory(config)


def configure(config, dataset):
    """Writes what the dataset determines into the config: ``dataset.num_classes`` (a list of parts
    per category for multi-category part segmentation) and ``model.network_model``."""
    task = dataset.task
    if task == "multi_segmentation":
        config.dataset.num_classes = list(dataset.num_parts)
    elif task == "segmentation" and getattr(dataset, "num_parts", None):
        config.dataset.num_classes = int(dataset.num_parts[0])  # one category: its parts
    else:
        config.dataset.num_classes = len(dataset.label_names)
    config.model.network_model = (
        "classification"
        if task == "classification"
        else ("multi_segmentation" if task == "multi_segmentation" else "segmentation")
    )
    return config
