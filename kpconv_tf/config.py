"""The typed configuration tree.

Every parameter of the original release's ``utils/config.py`` ``Config`` lives here under one of five
sections, with the original default. Names are the original attribute names in lower case
(``KP_extent`` -> ``model.kp_extent``); augmentation keys drop their ``augment_`` prefix.

    config = Config.from_yaml("training/configs/modelnet40.yaml", overrides=["train.learning_rate=0.01"])
    config.save_yaml(run_dir / "config.yaml")

Unknown keys and wrong types raise ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from kpconv_tf.architecture import BLOCK_TYPES, num_layers

# Offset regularisations of deformable KPConv (kpconv_tf.losses): the original's two and the later
# point-to-point definition of KPConv-PyTorch.
OFFSETS_LOSSES = ("permissive", "fitting", "point2point")
# What the dataset readers do with an input file that is malformed or holds non-finite values: stop
# with an error naming it, or skip it with a warning (counted per split).
BAD_FILE_POLICIES = ("error", "skip")
# How kpconv_tf.pyramid builds the input pyramid: the compiled CPU ops (tf_custom_ops) or the same
# results with standard TF ops only (kpconv_tf.standard_ops: CPU or GPU, no custom op library).
PYRAMID_IMPLEMENTATIONS = ("compiled", "standard")
# KPConv choices (paper section 3.3; kpconv_tf.ops, kpconv_tf.kernel_points).
INFLUENCES = ("constant", "linear", "gaussian")
AGGREGATIONS = ("sum", "closest")
FIXED_MODES = ("center", "verticals", "none")  # kernel point constraints
# The original's network_model names: KP-CNN for classification, KP-FCNN for the others.
NETWORK_MODELS = ("classification", "segmentation", "cloud_segmentation", "multi_segmentation")
SEMANTICS = ("original", "paper")  # offset-gradient handling and optimizer form (README)
ROTATIONS = ("vertical", "all", "none")
# tf.distribute strategies of training.distribute: one device, the GPUs (or logical CPUs) of this
# machine, or the workers of TF_CONFIG / a SLURM allocation.
STRATEGIES = ("default", "mirrored", "multiworker")


# Keys that a resumed run may take from the command line (``training.train --resume``): they change
# how long it runs, which saves it keeps, test-time votes, or nothing (parameters kept for
# parameters.txt only; ``model.pyramid`` builds the same inputs either way), never what a step
# computes. Every other key is the run's: a resume with another value is refused.
RUN_TIME_KEYS = (
    "train.max_epoch",
    "train.snapshot_gap",
    "train.votes",
    "train.strategy",  # a run may move to more or fewer devices (its data stream then differs)
    "train.save_freq",
    "train.saving",
    "train.saving_path",
    "dataset.input_threads",
    "model.pyramid",
)
# Keys that ``training.datasets.configure`` writes from the data (a config file leaves them unset).
DERIVED_KEYS = ("dataset.num_classes", "model.network_model")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclass
class DatasetConfig:
    """What to read and how the input is cut (original 'Input parameters')."""

    name: str = ""  # dataset class name, e.g. ModelNet40, S3DIS, EmbeddedShapes
    path: str = ""  # root directory in the dataset's original on-disk layout
    num_classes: int | list[int] = (
        0  # set from the dataset when 0; a list (parts per object) for multi_segmentation
    )
    in_points_dim: int = 3
    in_features_dim: int = 1
    in_radius: float = 1.0  # input sphere radius for scene datasets (metres)
    input_threads: int = 8
    validation_size: int = 100  # validation batches per epoch (scenes)
    split: str = ""  # dataset-specific split selector (e.g. ShapeNetPart category, S3DIS test area)
    # Predicted classes in order (S3DIS layout: annotation names; PointCloudFolder: names of label values
    # 0, 1, ...); empty: from the data.
    class_names: list[str] = field(default_factory=list)
    on_bad_file: str = "error"  # error | skip: a bad input file stops the run, or is skipped with a warning
    extra: dict[str, Any] = field(default_factory=dict)  # dataset-specific options


@dataclass
class ModelConfig:
    """Network and KPConv parameters (original 'Model' and 'KPConv' parameters)."""

    network_model: str = ""  # classification | segmentation | multi_segmentation
    architecture: list[str] = field(default_factory=list)
    first_features_dim: int = 64
    use_batch_norm: bool = True
    batch_norm_momentum: float = 0.99
    # Batch statistics over all replicas of a tf.distribute strategy (train.strategy); off: per
    # replica, as the original on one GPU.
    sync_batch_norm: bool = False
    segmentation_ratio: float = 1.0
    first_subsampling_dl: float = 0.02
    first_kernel_radius: float = 0.1  # deprecated in the original, kept for parameters.txt round trips
    num_kernel_points: int = 15
    density_parameter: float = 3.0
    kp_extent: float = 1.0
    kp_influence: str = "gaussian"  # constant | linear | gaussian
    convolution_mode: str = "closest"  # closest | sum  (the layers call it `aggregation`)
    fixed_kernel_points: str = "center"  # center | verticals | none
    trainable_positions: bool = False  # deprecated in the original
    modulated: bool = False
    # Deformable offsets are bounded to this many extents by a tanh (0: unbounded, the original).
    offset_bound: float = 0.0
    dropout: float = 0.5  # drop rate of the KP-CNN head (original feeds keep_prob 0.5)
    kernel_seed: int | None = None  # seeds the per-layer kernel rotations (None: random, as the original)
    pyramid: str = "compiled"  # compiled | standard: ops that build the input pyramid (kpconv_tf.pyramid)

    @property
    def num_layers(self) -> int:
        return num_layers(self.architecture)


@dataclass
class LRDecay:
    """The original's exponential decay in compact form: ``lr *= factor ** (every_epochs / over_epochs)``
    at the end of epochs ``every_epochs, 2 * every_epochs, ...`` (counted from 0, as the original's
    ``lr_decays`` keys), so the rate falls by ``factor`` over ``over_epochs`` epochs.
    ``{every_epochs: 1, factor: 0.1, over_epochs: 80}`` is ModelNet40's
    ``{i: 0.1 ** (1 / 80) for i in range(1, max_epoch)}``."""

    every_epochs: int = 1
    factor: float = 0.1
    over_epochs: int = 100


# Optimizers of train.optimizer besides every Keras optimizer name (keras.optimizers.get).
ORIGINAL_OPTIMIZER = "original_momentum"


@dataclass
class TrainConfig:
    """Optimiser, losses, schedule and bookkeeping (original 'Training parameters')."""

    learning_rate: float = 1e-4
    momentum: float = 0.9
    # original_momentum (TF1 momentum, training.trainer.OriginalMomentum) or a Keras optimizer name,
    # or a mapping {name: adamw, weight_decay: 1e-4, ...} of its constructor arguments; learning_rate
    # (with the decay) and, for original_momentum / sgd, momentum come from the keys above.
    optimizer: str | dict[str, Any] = ORIGINAL_OPTIMIZER
    # {epoch: factor}: lr *= factor at the end of epoch `epoch` counted from 0 (the original's keys);
    # replaced by lr_decay when that is given.
    lr_decays: dict[int, float] = field(default_factory=lambda: {200: 0.2, 300: 0.2})
    lr_decay: LRDecay | None = None
    grad_clip_norm: float = 100.0  # per-variable clipping by norm; <= 0 disables
    weights_decay: float = 1e-3
    gaussian_decay: float = 1e-3
    batch_averaged_loss: bool = False
    points_loss: str = ""  # deprecated in the original
    points_decay: float = 1e-2
    offsets_loss: str = "permissive"  # permissive | fitting | point2point (kpconv_tf.losses)
    offsets_decay: float = 1e-2
    repulse_extent: float = 1.2  # point2point: repulsion threshold between kernel points (extents)
    offset_lr_factor: float = 0.1  # offset variables learn at this factor of the learning rate
    batch_num: int = 10
    max_epoch: int = 1000
    epoch_steps: int | None = 1000  # None: one pass over the training split
    snapshot_gap: int = 50
    save_freq: int = 0  # steps between the commits inside an epoch (0: at the end of epochs only)
    saving: bool = True
    saving_path: str | None = None
    semantics: str = "paper"  # original | paper (see README: offset-gradient handling and optimizer form)
    strategy: str = "default"  # default | mirrored | multiworker (training.distribute)
    seed: int = 0
    votes: int = 100  # test-time augmented passes for objects

    def decays(self) -> dict[int, float]:
        """``{epoch: factor}`` of the learning-rate decay: ``lr_decay`` expanded up to ``max_epoch``,
        else ``lr_decays``."""
        if self.lr_decay is None:
            return dict(self.lr_decays)
        d = self.lr_decay
        factor = d.factor ** (d.every_epochs / d.over_epochs)
        return dict.fromkeys(range(d.every_epochs, self.max_epoch, d.every_epochs), factor)

    def optimizer_name(self) -> str:
        return self.optimizer if isinstance(self.optimizer, str) else str(self.optimizer.get("name", ""))


@dataclass
class AugmentConfig:
    """Augmentation (original ``augment_*`` parameters)."""

    scale_anisotropic: bool = True
    scale_min: float = 0.9
    scale_max: float = 1.1
    symmetries: list[bool] = field(default_factory=lambda: [False, False, False])
    rotation: str = "vertical"  # vertical | all | none
    noise: float = 0.005
    occlusion: str = "planar"  # unused by the original pipelines; kept for parameters.txt
    occlusion_ratio: float = 0.2
    occlusion_num: int = 1
    color: float = 0.7  # probability of keeping the colours


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> Config:
        config = _build(cls, data or {}, "")
        train = (data or {}).get("train") or {}
        if train.get("lr_decay") is not None and train.get("lr_decays"):
            raise ConfigError("train.lr_decay and train.lr_decays are both given: keep one")
        for item in overrides or []:
            config.set(item)
        if config.train.lr_decay is not None:
            config.train.lr_decays = {}  # lr_decay replaces them (also when set by an override)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        return cls.from_dict(data, overrides)

    def save_yaml(self, path: str | Path) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, default_flow_style=None)

    def set(self, assignment: str) -> None:
        """Applies one ``section.key=value`` override; the value is parsed as YAML."""
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
        dotted, text = assignment.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {dotted!r} must be section.key")
        section_name, key = parts
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section {section_name!r} in override {dotted!r}")
        hints = typing.get_type_hints(type(section))
        if key not in hints:
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(section, key, _coerce(hints[key], yaml.safe_load(text), dotted))

    def validate(self) -> None:
        d, m, t, a = self.dataset, self.model, self.train, self.augment
        _choice("dataset.on_bad_file", d.on_bad_file, BAD_FILE_POLICIES)
        _choice("model.kp_influence", m.kp_influence, INFLUENCES)
        _choice("model.convolution_mode", m.convolution_mode, AGGREGATIONS)
        _choice("model.fixed_kernel_points", m.fixed_kernel_points, FIXED_MODES)
        _choice("model.pyramid", m.pyramid, PYRAMID_IMPLEMENTATIONS)
        if m.network_model:  # empty: not chosen yet (the dataset readers set it)
            _choice("model.network_model", m.network_model, NETWORK_MODELS)
        for i, name in enumerate(m.architecture):
            _choice(f"model.architecture[{i}]", name, BLOCK_TYPES)
        _choice("train.semantics", t.semantics, SEMANTICS)
        _choice("train.strategy", t.strategy, STRATEGIES)
        _choice("train.offsets_loss", t.offsets_loss, OFFSETS_LOSSES)
        _choice("augment.rotation", a.rotation, ROTATIONS)
        for key, value in (
            ("model.first_subsampling_dl", m.first_subsampling_dl),
            ("model.kp_extent", m.kp_extent),
            ("model.density_parameter", m.density_parameter),
            ("train.learning_rate", t.learning_rate),
        ):
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if m.offset_bound < 0:
            raise ConfigError(f"model.offset_bound must be >= 0 (0: unbounded), got {m.offset_bound}")
        if not (t.optimizer_name() and isinstance(t.optimizer, (str, dict))):
            raise ConfigError(
                f"train.optimizer must be a name or a mapping with a 'name', got {t.optimizer!r}"
            )
        if t.semantics == "original" and t.optimizer_name() != ORIGINAL_OPTIMIZER:
            raise ConfigError(
                f"train.semantics 'original' needs train.optimizer {ORIGINAL_OPTIMIZER!r} (its double "
                f"update of the offset variables is a momentum update), got {t.optimizer_name()!r}: "
                "use semantics 'paper'"
            )
        if t.lr_decay is not None and not (
            t.lr_decay.every_epochs >= 1 and t.lr_decay.over_epochs >= 1 and t.lr_decay.factor > 0
        ):
            raise ConfigError(
                f"train.lr_decay needs every_epochs >= 1, over_epochs >= 1, factor > 0: {t.lr_decay}"
            )
        if not t.offset_lr_factor >= 0:
            raise ConfigError(f"train.offset_lr_factor must be >= 0, got {t.offset_lr_factor}")
        if m.num_kernel_points < 1:
            raise ConfigError(f"model.num_kernel_points must be >= 1, got {m.num_kernel_points}")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if len(a.symmetries) != 3:
            raise ConfigError(f"augment.symmetries must have 3 entries, got {a.symmetries}")
        if a.scale_min > a.scale_max:
            raise ConfigError("augment.scale_min must be <= augment.scale_max")


def config_differences(a: Config, b: Config, ignore=()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose values differ, in tree order;
    keys in ``ignore`` are skipped."""
    found = []
    for section_field in dataclasses.fields(Config):
        section_a, section_b = getattr(a, section_field.name), getattr(b, section_field.name)
        for key_field in dataclasses.fields(section_a):
            dotted = f"{section_field.name}.{key_field.name}"
            value_a, value_b = getattr(section_a, key_field.name), getattr(section_b, key_field.name)
            if dotted not in ignore and value_a != value_b:
                found.append((dotted, value_a, value_b))
    return found


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError("unknown config key(s): " + ", ".join(prefix + k for k in unknown))
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(hint, value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    """Checks ``value`` against the annotation ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        if args and args[1] is Any:
            return dict(value)
        return {
            _coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}[{k}]") for k, v in value.items()
        }
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)  # dict keys of lr_decays may come as strings
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' (no dot, no sign) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")
