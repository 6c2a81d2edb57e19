"""convert.save_original_checkpoint: the reverse of the checkpoint import, in the original's format."""

from pathlib import Path

import numpy as np
import tensorflow as tf

from kpconv_tf import convert

FIXTURES = Path(__file__).parent / "fixtures" / "original_tf" / "train_public" / "kpcnn"


def test_export_reproduces_the_original_checkpoint(tmp_path):
    config = convert.config_from_original(FIXTURES / "parameters.txt")
    source = str(FIXTURES / "init_ckpt" / "model.ckpt")
    model = convert.load_original_checkpoint(source, config)
    prefix = convert.save_original_checkpoint(model, tmp_path / "snapshots" / "snap-0")
    original, ours = tf.train.load_checkpoint(source), tf.train.load_checkpoint(prefix)
    assert ours.get_variable_to_shape_map() == original.get_variable_to_shape_map()
    assert ours.get_variable_to_dtype_map() == original.get_variable_to_dtype_map()
    for name in original.get_variable_to_shape_map():
        np.testing.assert_array_equal(ours.get_tensor(name), original.get_tensor(name), err_msg=name)
    assert tf.train.latest_checkpoint(str(tmp_path / "snapshots")) == str(Path(prefix).resolve())
    # and back: a changed model survives the round trip
    variable = model.original_variables()["KernelPointNetwork/softmax/bias"]
    variable.assign(np.arange(variable.shape[0], dtype=np.float32))
    convert.save_original_checkpoint(model, prefix)
    reloaded = convert.load_original_checkpoint(prefix, config)
    for name, v in reloaded.original_variables().items():
        np.testing.assert_array_equal(v.numpy(), model.original_variables()[name].numpy(), err_msg=name)
