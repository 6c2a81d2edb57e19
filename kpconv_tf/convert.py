"""From the original release to ours: parameters.txt, checkpoints and flat input lists.

* ``config_from_original(source)``: our ``Config`` from an original ``parameters.txt`` (path to the
  file or to its directory) or from a dict of the original ``Config`` attribute names.
* ``original_variable_map(model)``: {original variable name: our variable}.
* ``load_original_checkpoint(prefix, config)``: a built model carrying every original variable
  (kernel points included: they are read, never regenerated).
* ``save_original_checkpoint(model, prefix)``: the reverse, an original-format TF1 checkpoint.
* ``inputs_from_original(flat_inputs, config)``: our input dict from the original's flat list.

KP-CNN, KP-FCNN and the multi-head part-segmentation KP-FCNN are covered.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.inputs import BATCH_INDEX, FEATURES, input_spec, layer_keys
from kpconv_tf.models import build_network

_SECTIONS = {
    "dataset": {
        "dataset": "name",
        "num_classes": "num_classes",
        "in_points_dim": "in_points_dim",
        "in_features_dim": "in_features_dim",
        "in_radius": "in_radius",
        "input_threads": "input_threads",
        "validation_size": "validation_size",
    },
    "model": {
        "network_model": "network_model",
        "architecture": "architecture",
        "first_features_dim": "first_features_dim",
        "use_batch_norm": "use_batch_norm",
        "batch_norm_momentum": "batch_norm_momentum",
        "segmentation_ratio": "segmentation_ratio",
        "first_subsampling_dl": "first_subsampling_dl",
        "first_kernel_radius": "first_kernel_radius",
        "num_kernel_points": "num_kernel_points",
        "density_parameter": "density_parameter",
        "fixed_kernel_points": "fixed_kernel_points",
        "KP_extent": "kp_extent",
        "KP_influence": "kp_influence",
        "convolution_mode": "convolution_mode",
        "trainable_positions": "trainable_positions",
        "modulated": "modulated",
    },
    "train": {
        "learning_rate": "learning_rate",
        "momentum": "momentum",
        "lr_decays": "lr_decays",
        "grad_clip_norm": "grad_clip_norm",
        "weights_decay": "weights_decay",
        "gaussian_decay": "gaussian_decay",
        "batch_averaged_loss": "batch_averaged_loss",
        "offsets_loss": "offsets_loss",
        "offsets_decay": "offsets_decay",
        "batch_num": "batch_num",
        "max_epoch": "max_epoch",
        "epoch_steps": "epoch_steps",
        "snapshot_gap": "snapshot_gap",
    },
    "augment": {
        f"augment_{k}": k
        for k in (
            "scale_anisotropic",
            "scale_min",
            "scale_max",
            "symmetries",
            "rotation",
            "noise",
            "occlusion",
            "occlusion_ratio",
            "occlusion_num",
            "color",
        )
    },
}
_IGNORED = {"num_layers", "saving", "saving_path", "GPU_ID"}


def _parse_value(key, words):
    if key == "lr_decay_epochs":
        return {int(w.split(":")[0]): float(w.split(":")[1]) for w in words}
    if key == "architecture":
        return list(words)
    if key == "augment_symmetries":
        return [bool(int(w)) for w in words]
    if key == "num_classes" and len(words) > 1:
        return [int(w) for w in words]
    text = words[0]
    if text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_parameters(path: str | Path) -> dict[str, object]:
    """The original attribute values stored in a ``parameters.txt`` (file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "parameters.txt"
    if not path.is_file():
        raise FileNotFoundError(f"original parameters file not found: {path}")
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if len(words) < 3 or words[0].startswith("#"):
            continue
        if words[1] != "=":
            raise ValueError(f"{path}:{number}: expected 'name = value', got {line!r}")
        key = "lr_decays" if words[0] == "lr_decay_epochs" else words[0]
        values[key] = _parse_value(words[0], words[2:])
    return values


def config_from_original(source) -> Config:
    """Our config from an original parameters.txt (path) or a dict of original attribute names."""
    values = dict(source) if isinstance(source, dict) else read_parameters(source)
    data = {section: {} for section in _SECTIONS}
    for key, value in values.items():
        for section, names in _SECTIONS.items():
            if key in names:
                data[section][names[key]] = value
                break
        else:
            if key not in _IGNORED:
                raise ValueError(f"unknown original parameter {key!r}")
    model = data["model"]
    for flag in ("use_batch_norm", "trainable_positions", "modulated"):
        if flag in model:
            model[flag] = bool(model[flag])
    for flag in ("batch_averaged_loss",):
        if flag in data["train"]:
            data["train"][flag] = bool(data["train"][flag])
    if "scale_anisotropic" in data["augment"]:
        data["augment"]["scale_anisotropic"] = bool(data["augment"]["scale_anisotropic"])
    for section, key in (("model", "first_features_dim"), ("model", "num_kernel_points")):
        if key in data[section]:
            data[section][key] = int(data[section][key])
    for section, names in _SECTIONS.items():
        for key in names.values():
            value = data[section].get(key)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and key
                not in (
                    "num_classes",
                    "in_points_dim",
                    "in_features_dim",
                    "input_threads",
                    "validation_size",
                    "first_features_dim",
                    "num_kernel_points",
                    "batch_num",
                    "max_epoch",
                    "epoch_steps",
                    "snapshot_gap",
                    "occlusion_num",
                )
            ):
                data[section][key] = float(value)
    data["train"]["semantics"] = "original"
    return Config.from_dict(data)


def original_variable_map(model) -> dict[str, tf.Variable]:
    """{original variable name: our variable} of a built model."""
    return model.original_variables()


def load_original_checkpoint(checkpoint_prefix: str | Path, config: Config):
    """A model built for ``config`` with every variable read from an original TF1 checkpoint.

    Raises ValueError listing the variables that are missing on either side or mis-shaped.
    """
    prefix = str(checkpoint_prefix)
    if os.path.isdir(prefix):
        prefix = tf.train.latest_checkpoint(prefix) or os.path.join(prefix, "model.ckpt")
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    model = build_network(config)
    mapping = original_variable_map(model)
    stored = {name for name in shapes if name.startswith("KernelPointNetwork/")}
    missing = sorted(set(mapping) - stored)
    unused = sorted(stored - set(mapping))
    misshaped = sorted(
        f"{name}: checkpoint {shapes[name]} vs model {list(var.shape)}"
        for name, var in mapping.items()
        if name in stored and list(shapes[name]) != list(var.shape)
    )
    if missing or unused or misshaped:
        raise ValueError(
            "checkpoint does not match the configured model:\n"
            + "".join(f"  missing in checkpoint: {n}\n" for n in missing)
            + "".join(f"  not used by the model: {n}\n" for n in unused)
            + "".join(f"  shape mismatch: {n}\n" for n in misshaped)
        )
    for name, variable in mapping.items():
        variable.assign(reader.get_tensor(name))
    return model


def save_original_checkpoint(model, checkpoint_prefix: str | Path) -> str:
    """Writes ``model`` as an original-format TF1 checkpoint (``prefix.index`` / ``.data-*``).

    Variables carry their original names (``original_variable_map``), which is the variable list
    of the original trainer's ``Saver`` (momentum slots are not part of it, as in the original).
    A ``checkpoint`` state file is written next to it so that ``tf.train.latest_checkpoint`` finds
    it. Returns the prefix.
    """
    prefix = str(checkpoint_prefix)
    mapping = original_variable_map(model)
    if not mapping:
        raise ValueError("model: no original variables (build the model first)")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    names = sorted(mapping)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.convert_to_tensor(mapping[n]) for n in names],
    )
    tf.compat.v1.train.update_checkpoint_state(
        os.path.dirname(os.path.abspath(prefix)), os.path.abspath(prefix)
    )
    return prefix


def _lengths_from_batches(batches, num_points):
    return np.sum(np.asarray(batches) < num_points, axis=1).astype(np.int32)


def inputs_from_original(flat_inputs, config: Config) -> dict[str, tf.Tensor]:
    """Our input dict from the original's flat input list.

    Classification order: points, neighbors, pools (one per layer), features, batch_weights,
    in_batches, out_batches, labels, ... Segmentation adds upsamples (one per layer) after the
    pools, and for ``multi_segmentation`` the per-point object labels after the point labels.
    Per-layer lengths are recovered from ``in_batches`` and the first pooling neighbour of every
    point of the next layer (that neighbour lies in the same cloud).
    """
    num_layers = config.model.num_layers
    # The original's segmentation pipelines always hold upsamples; what we keep is input_spec's.
    segmentation = config.model.network_model not in ("classification", "")
    groups = 4 if segmentation else 3
    flat = [np.asarray(x) for x in flat_inputs]
    if len(flat) < groups * num_layers + 5:
        raise ValueError(
            f"flat_inputs has {len(flat)} entries; a {num_layers}-layer "
            f"{config.model.network_model or 'classification'} batch has at least "
            f"{groups * num_layers + 5}"
        )
    points = flat[:num_layers]
    neighbors = flat[num_layers : 2 * num_layers]
    pools = flat[2 * num_layers : 3 * num_layers]
    upsamples = flat[3 * num_layers : 4 * num_layers] if segmentation else None
    rest = flat[groups * num_layers :]
    features, _, in_batches = rest[:3]
    lengths = [_lengths_from_batches(in_batches, len(points[0]))]
    for l in range(num_layers - 1):
        owner = np.repeat(np.arange(len(lengths[l])), lengths[l])
        first = pools[l][:, 0]
        if np.any(first >= len(points[l])):
            raise ValueError(f"pools_{l} has a row without neighbours: cannot recover its cloud")
        lengths.append(np.bincount(owner[first], minlength=len(lengths[l])).astype(np.int32))
    batch_index = np.repeat(np.arange(len(lengths[0])), lengths[0])
    inputs = {
        FEATURES: tf.constant(features, tf.float32),
        BATCH_INDEX: tf.constant(batch_index, tf.int32),
    }
    if config.model.network_model == "multi_segmentation":
        point_objects = rest[5]
        starts = np.concatenate([[0], np.cumsum(lengths[0])[:-1]])
        inputs["object_labels"] = tf.constant(point_objects[starts], tf.int32)
    spec = input_spec(config)
    for l in range(num_layers):
        keys = layer_keys(l)
        values = {keys.points: points[l], keys.neighbors: neighbors[l], keys.lengths: lengths[l]}
        if l < num_layers - 1:
            values[keys.pools] = pools[l]
            if segmentation:
                values[keys.upsamples] = upsamples[l]
        inputs.update({key: tf.constant(v, spec[key].dtype) for key, v in values.items() if key in spec})
    return inputs


def latest_snapshot(run_dir: str | Path) -> Path:
    """The newest ``snapshots/snap-N`` checkpoint prefix of an original run directory."""
    snaps = sorted(Path(run_dir).glob("snapshots/snap-*.index"), key=lambda p: int(p.stem.split("-")[-1]))
    if not snaps:
        raise FileNotFoundError(
            f"no snapshots/snap-N.index under {run_dir} (original run layout expected: "
            "parameters.txt and snapshots/)"
        )
    return snaps[-1].with_suffix("")


def convert_run(run_dir: str | Path, out_dir: str | Path):
    """Original run directory -> ``out_dir/config.yaml`` + ``out_dir/model.weights.h5``."""
    config = config_from_original(run_dir)
    model = load_original_checkpoint(latest_snapshot(run_dir), config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_yaml(out / "config.yaml")
    model.save_weights(out / "model.weights.h5")
    return out / "config.yaml", out / "model.weights.h5"


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert a run of the original KPConv release (parameters.txt + snapshots/snap-N) "
        "into a kpconv-tf config YAML and a Keras weights file."
    )
    parser.add_argument("original_log_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    config_path, weights_path = convert_run(args.original_log_dir, args.out_dir)
    print(f"config: {config_path}\nweights: {weights_path}")


if __name__ == "__main__":
    main()
