"""The KpconvMaxPool op and its gradient: against a float64 brute force and, bit for bit, against
the standard-op formulation (gather, reduce_max) that the original uses."""

import numpy as np
import tensorflow as tf

import tf_custom_ops


def reference(features, shadow, pools, grad):
    """float64 max per row and its gradient (ties share equally, as reduce_max's gradient)."""
    padded = np.concatenate([features, shadow[None]]).astype(np.float64)
    m, c = pools.shape[0], features.shape[1]
    pooled = np.full((m, c), -np.inf)
    grad_padded = np.zeros_like(padded)
    for i in range(m):
        if pools.shape[1] == 0:
            continue
        rows = padded[pools[i]]
        pooled[i] = rows.max(axis=0)
        ties = rows == pooled[i]
        share = grad[i] / ties.sum(axis=0)
        for h, s in enumerate(pools[i]):
            grad_padded[s] += np.where(ties[h], share, 0.0)
    return pooled, grad_padded[:-1], grad_padded[-1]


def standard(features, pools):
    padded = tf.concat([features, tf.reduce_min(features, axis=0, keepdims=True)], axis=0)
    return tf.reduce_max(tf.gather(padded, pools), axis=1)


def fused(features, pools):
    return tf_custom_ops.max_pool(features, tf.reduce_min(features, axis=0), pools)


def _value_and_gradient(function, features, pools, grad):
    features = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(features)
        out = function(features, tf.constant(pools))
        loss = tf.reduce_sum(out * grad)
    return out.numpy(), tape.gradient(loss, features).numpy()


def _problem(rng, ns, m, h, c, ties=False):
    features = rng.standard_normal((ns, c)).astype(np.float32)
    if ties:
        features = np.round(features)  # many equal values per channel
    pools = rng.integers(0, ns + 1, (m, h)).astype(np.int32)
    grad = rng.standard_normal((m, c)).astype(np.float32)
    return features, pools, grad


class MaxPoolTest(tf.test.TestCase):
    def test_matches_float64_reference(self):
        rng = np.random.default_rng(0)
        for ties in (False, True):
            features, pools, grad = _problem(rng, 200, 60, 9, 7, ties)
            shadow = features.min(axis=0)
            with tf.GradientTape(persistent=True) as tape:
                f, s = tf.constant(features), tf.constant(shadow)
                tape.watch([f, s])
                out = tf_custom_ops.max_pool(f, s, pools)
                loss = tf.reduce_sum(out * grad)
            ref_out, ref_gf, ref_gs = reference(features, shadow, pools, grad)
            self.assertAllClose(out, ref_out, rtol=0, atol=0)
            self.assertAllClose(tape.gradient(loss, f), ref_gf, rtol=1e-6, atol=1e-6)
            self.assertAllClose(tape.gradient(loss, s), ref_gs, rtol=1e-6, atol=1e-6)

    def test_bitwise_equal_to_the_standard_formulation(self):
        rng = np.random.default_rng(1)
        cases = [
            (500, 120, 16, 33, False),  # channels not a multiple of the vector width
            (40, 30, 8, 4, True),  # ties, shadow rows among the maxima
            (1, 5, 3, 6, False),  # one point: every row is it or the shadow
            (0, 4, 2, 3, False),  # no point: every entry is the shadow
            (10, 0, 4, 3, False),  # no pooling row
            (3000, 700, 40, 64, False),  # several support ranges in the gradient
        ]
        for ns, m, h, c, ties in cases:
            features, pools, grad = _problem(rng, ns, m, h, c, ties)
            ours = _value_and_gradient(fused, features, pools, grad)
            theirs = _value_and_gradient(standard, features, pools, grad)
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a, b, err_msg=f"case {(ns, m, h, c, ties)}")

    def test_duplicated_neighbours_share_the_gradient(self):
        features = np.array([[1.0, 5.0], [3.0, 2.0]], np.float32)
        pools = np.array([[1, 1, 0], [0, 2, 2]], np.int32)  # index 2 is the shadow
        out, grad = _value_and_gradient(fused, features, pools, np.ones((2, 2), np.float32))
        np.testing.assert_array_equal(out, [[3.0, 5.0], [1.0, 5.0]])
        # row 0: point 1 twice for channel 0 (1/2 each), point 0 for channel 1; row 1: point 0
        # ties with the shadow (the minimum, point 0 itself) for channel 0, point 0 for channel 1.
        theirs = _value_and_gradient(standard, features, pools, np.ones((2, 2), np.float32))
        np.testing.assert_array_equal(grad, theirs[1])
        self.assertAllClose(grad.sum(), 4.0)

    def test_empty_rows_give_minus_infinity(self):
        out = tf_custom_ops.max_pool(tf.ones([3, 2]), tf.ones([2]), tf.zeros([2, 0], tf.int32))
        self.assertAllEqual(out, np.full((2, 2), -np.inf, np.float32))

    def test_dynamic_shapes_in_tf_function(self):
        signature = [tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.int32)]
        pool = tf.function(fused, input_signature=signature)
        rng = np.random.default_rng(2)
        for ns, m, h, c in [(30, 10, 4, 3), (80, 25, 9, 5)]:
            features, pools, _ = _problem(rng, ns, m, h, c)
            np.testing.assert_array_equal(pool(features, pools), standard(features, pools))
        self.assertEqual(pool.get_concrete_function().structured_outputs.shape.as_list(), [None, None])

    def test_bad_input_names_the_argument(self):
        f, s = tf.ones([4, 3]), tf.ones([3])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"pools\[1, 0\] = 5 is not in \[0, 4\]"):
            tf_custom_ops.max_pool(f, s, [[0, 1], [5, 0]])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"pools\[0, 1\] = -1"):
            tf_custom_ops.max_pool(f, s, [[0, -1]])
        with self.assertRaisesRegex((ValueError, tf.errors.InvalidArgumentError), "shadow|Dimensions"):
            tf_custom_ops.max_pool(f, tf.ones([2]), [[0]])
        with self.assertRaisesRegex(TypeError, "pools must be int32"):
            tf_custom_ops.max_pool(f, s, tf.zeros([1, 1], tf.int64))
        with self.assertRaisesRegex(TypeError, "features must be float32"):
            tf_custom_ops.max_pool(tf.ones([4, 3], tf.float64), s, [[0]])
        grad_op = tf_custom_ops._ops.kpconv_max_pool_grad
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "grad must have shape"):
            grad_op(f, s, [[0, 1]], tf.ones([1, 3]), tf.ones([2, 3]))


if __name__ == "__main__":
    tf.test.main()
