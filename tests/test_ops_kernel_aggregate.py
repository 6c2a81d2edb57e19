"""The fused KpconvKernelAggregate op and its gradient, against float64 references."""

import numpy as np
import pytest
import tensorflow as tf
from kpconv_reference import influence as reference_influence
from kpconv_reference import random_problem

import tf_custom_ops
from kpconv_tf import ops

MODES = [(i, a) for i in ops.INFLUENCES for a in ops.AGGREGATIONS]


def reference_sums(q, s, n, f, kernel_points, extent, infl, agg):
    """float64 [Nq, K, Din]: sum_h w f over real neighbours (shadows skipped), as the op defines."""
    q, s, f, kernel_points = (np.asarray(a, np.float64) for a in (q, s, f, kernel_points))
    deformable = kernel_points.ndim == 3
    nq, k, d = q.shape[0], kernel_points.shape[-2], f.shape[1]
    out = np.zeros((nq, k, d))
    for i in range(nq):
        kp = kernel_points[i] if deformable else kernel_points
        for j in n[i]:
            if j == s.shape[0]:
                continue
            d2 = np.sum((s[j] - q[i] - kp) ** 2, axis=1)
            if deformable and not np.any(d2 < extent**2):
                continue
            w = reference_influence(d2[None], extent, infl, agg, deformable)[0]
            out[i] += w[:, None] * f[j][None]
    return out


def _problem(seed, deformable, **kwargs):
    rng = np.random.default_rng(seed)
    q, s, n, f, kp, _ = random_problem(rng, **kwargs)
    if deformable:
        kp = (kp[None] + rng.normal(scale=0.1, size=(q.shape[0],) + kp.shape)).astype(np.float32)
    return q, s, n, f, kp


class KernelAggregateTest(tf.test.TestCase):
    def test_matches_float64_reference_in_every_mode(self):
        for deformable in (False, True):
            for seed, (infl, agg) in enumerate(MODES):
                q, s, n, f, kp = _problem(seed, deformable)
                out = tf_custom_ops.kernel_aggregate(q, s, n, f, kp, 0.3, infl, agg)
                ref = reference_sums(q, s, n, f, kp, 0.3, infl, agg)
                self.assertAllClose(
                    out,
                    ref,
                    rtol=1e-5,
                    atol=1e-5 * np.abs(ref).max(),
                    msg=f"{infl}/{agg} deformable={deformable}",
                )
                # The last queries are isolated: every neighbour is a shadow.
                self.assertAllEqual(out[-3:], np.zeros_like(out[-3:]))

    def test_gradients_match_float64_autodiff_of_standard_ops(self):
        for deformable in (False, True):
            for seed, (infl, agg) in enumerate(MODES):
                q, s, n, f, kp = _problem(10 + seed, deformable, nq=40, ns=60, h=10)
                r = np.random.default_rng(seed).normal(size=(q.shape[0], kp.shape[-2], f.shape[1]))
                grads = []
                for implementation, dtype in (("fused", tf.float32), ("standard", tf.float64)):
                    args = [tf.constant(a, dtype) for a in (q, s, f, kp)]
                    with tf.GradientTape() as tape:
                        tape.watch(args)
                        qt, st, ft, kt = args
                        if implementation == "fused":
                            sums = tf_custom_ops.kernel_aggregate(qt, st, n, ft, kt, 0.3, infl, agg)
                        else:  # the standard path's sums: project with identity weights
                            k, d = kp.shape[-2], f.shape[1]
                            eye = tf.reshape(tf.eye(k * d, dtype=dtype), [k, d, k * d])
                            if deformable:
                                flat = ops.kpconv_deformable(
                                    qt, st, n, ft, tf.zeros_like(kt[0]), kt, eye, 0.3, infl, agg
                                )
                            else:
                                flat = ops.kpconv(qt, st, n, ft, kt, eye, 0.3, infl, agg)
                            sums = tf.reshape(flat, [-1, k, d])
                        loss = tf.reduce_sum(sums * tf.constant(r, dtype))
                    grads.append(
                        [
                            None if g is None else tf.convert_to_tensor(g).numpy()
                            for g in tape.gradient(loss, args)
                        ]
                    )
                for name, fused, reference in zip(
                    ("queries", "supports", "features", "kernel points"), *grads
                ):
                    if reference is None:  # constant influence: no geometric gradient
                        self.assertAllEqual(fused, np.zeros_like(fused))
                        continue
                    scale = max(np.abs(reference).max(), 1e-12)
                    self.assertLess(
                        np.abs(fused - reference).max() / scale,
                        2e-4,
                        msg=f"{name}: {infl}/{agg} deformable={deformable}",
                    )

    def test_feature_gradient_alone_and_across_blocks(self):
        # 1200 queries: the backward pass splits them into many blocks of queries and of supports,
        # whose neighbours fall in several blocks. geometry_gradients=False must change nothing
        # but drop the geometric gradients.
        rng = np.random.default_rng(21)
        for deformable in (False, True):
            for infl, agg in MODES:
                q, s, n, f, kp = _problem(22, deformable, nq=1200, ns=1200, h=16, d_in=3)
                k = kp.shape[-2]
                r = rng.normal(size=(q.shape[0], k, f.shape[1]))
                # float64 reference: d loss / d features[j] = sum over (i, h, k) with n[i, h] = j.
                s_pad = np.concatenate([s, np.full((1, 3), 1e6)], 0).astype(np.float64)
                kpts = kp if deformable else kp[None]
                y = s_pad[n] - q[:, None, :].astype(np.float64)
                d2 = np.sum((y[:, :, None, :] - np.asarray(kpts, np.float64)[:, None]) ** 2, axis=-1)
                w = reference_influence(d2, 0.3, infl, agg, deformable)
                if deformable:
                    w = w * np.any(d2 < 0.3**2, axis=-1, keepdims=True)
                w = w * (n < s.shape[0])[:, :, None]
                reference = np.zeros((s.shape[0] + 1, f.shape[1]))
                np.add.at(reference, n.ravel(), np.einsum("nhk,nkd->nhd", w, r).reshape(-1, f.shape[1]))
                reference = reference[:-1]
                for geometry in (True, False):
                    qt, ft, kt = (tf.constant(a) for a in (q, f, kp))
                    with tf.GradientTape() as tape:
                        tape.watch([qt, ft, kt])
                        sums = tf_custom_ops.kernel_aggregate(
                            qt, s, n, ft, kt, 0.3, infl, agg, geometry_gradients=geometry
                        )
                        loss = tf.reduce_sum(sums * tf.constant(r, tf.float32))
                    grad_q, grad_f, grad_k = tape.gradient(loss, [qt, ft, kt])
                    msg = f"{infl}/{agg} deformable={deformable} geometry={geometry}"
                    self.assertAllClose(
                        grad_f, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), msg=msg
                    )
                    if not geometry:
                        self.assertIsNone(grad_q, msg=msg)
                        self.assertIsNone(grad_k, msg=msg)
                    elif infl != "constant":
                        self.assertGreater(np.abs(grad_k.numpy()).max(), 0.0, msg=msg)

    def test_edge_cases(self):
        rng = np.random.default_rng(3)
        kp = rng.normal(size=(5, 3)).astype(np.float32) * 0.1
        f4 = rng.normal(size=(4, 2)).astype(np.float32)
        # No queries, no supports (every neighbour a shadow), no columns.
        self.assertEqual(
            tf_custom_ops.kernel_aggregate(
                np.zeros((0, 3)), np.zeros((4, 3)), np.zeros((0, 3), np.int32), f4, kp, 0.2
            ).shape,
            (0, 5, 2),
        )
        out = tf_custom_ops.kernel_aggregate(
            np.zeros((2, 3)),
            np.zeros((0, 3)),
            np.zeros((2, 3), np.int32),
            np.zeros((0, 2), np.float32),
            kp,
            0.2,
        )
        self.assertAllEqual(out, np.zeros((2, 5, 2)))
        out = tf_custom_ops.kernel_aggregate(
            np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((2, 0), np.int32), f4, kp, 0.2
        )
        self.assertAllEqual(out, np.zeros((2, 5, 2)))
        # Duplicate neighbours count as often as they are listed; one point is its own neighbour.
        p = np.zeros((1, 3), np.float32)
        once = tf_custom_ops.kernel_aggregate(p, p, [[0]], f4[:1], kp, 0.5, "gaussian")
        twice = tf_custom_ops.kernel_aggregate(p, p, [[0, 0]], f4[:1], kp, 0.5, "gaussian")
        self.assertAllClose(twice, 2 * once.numpy())
        self.assertAllClose(once, reference_sums(p, p, np.array([[0]]), f4[:1], kp, 0.5, "gaussian", "sum"))
        # A huge extent reaches every kernel point, even one whose square overflows float (and
        # then reaches the op's internal padding too, which must stay out of the sums); a tiny
        # one, even with a subnormal square, reaches none (linear).
        for deformable in (False, True):
            q, s, n, f, kp15 = _problem(4, deformable)
            for extent in (1e6, 1e17, 1e20):
                for infl in ops.INFLUENCES:
                    self.assertAllClose(
                        tf_custom_ops.kernel_aggregate(q, s, n, f, kp15, extent, infl),
                        reference_sums(q, s, n, f, kp15, extent, infl, "sum"),
                        rtol=1e-5,
                        atol=1e-4,
                        msg=f"{infl} extent={extent} deformable={deformable}",
                    )
            for extent in (1e-12, 1e-20):
                self.assertAllEqual(
                    tf_custom_ops.kernel_aggregate(q, s, n, f, kp15, extent),
                    np.zeros((q.shape[0], 15, f.shape[1])),
                )

    def test_dynamic_shapes_in_tf_function(self):
        spec = [
            tf.TensorSpec([None, 3]),
            tf.TensorSpec([None, 3]),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, None]),
            tf.TensorSpec([None, None, 3]),
        ]

        @tf.function(input_signature=spec)
        def aggregate(q, s, n, f, kp):
            out = tf_custom_ops.kernel_aggregate(q, s, n, f, kp, 0.3, "linear", "sum")
            self.assertEqual(out.shape.rank, 3)
            return out

        for nq, ns, h in ((20, 30, 4), (35, 50, 9)):
            q, s, n, f, kp = _problem(nq, True, nq=nq, ns=ns, h=h)
            self.assertAllClose(
                aggregate(q, s, n, f, kp),
                reference_sums(q, s, n, f, kp, 0.3, "linear", "sum"),
                rtol=1e-5,
                atol=1e-5,
            )

    def test_bad_input_names_the_argument(self):
        q, s, n, f, kp = _problem(5, False, nq=10, ns=12, h=4)
        cases = [
            (dict(neighbors=np.where(n == 12, 13, n).astype(np.int32)), "neighbors"),
            (dict(neighbors=np.where(n == 12, -1, n).astype(np.int32)), "neighbors"),
            (dict(neighbors=n[:5]), "neighbors"),
            (dict(features=f[:5]), "features"),
            (dict(query_points=q[:, :2]), "query_points"),
            (dict(support_points=s[:, :2]), "support_points"),
            (dict(kernel_points=kp[:, :2]), "kernel_points"),
            (dict(kernel_points=kp[:0]), "kernel_points"),
            (dict(extent=0.0), "extent"),
            (dict(extent=float("nan")), "extent"),
        ]
        base = dict(query_points=q, support_points=s, neighbors=n, features=f, kernel_points=kp, extent=0.3)
        for change, name in cases:
            args = dict(base, **change)
            with self.assertRaisesRegex((tf.errors.InvalidArgumentError, ValueError), name):
                tf_custom_ops.kernel_aggregate(**args)
            if name in ("neighbors",) and args["neighbors"].shape == n.shape:  # runtime check in a graph
                fn = tf.function(lambda a=args: tf_custom_ops.kernel_aggregate(**a))
                with self.assertRaisesRegex(tf.errors.InvalidArgumentError, name):
                    fn()
        with self.assertRaisesRegex(TypeError, "features"):
            tf_custom_ops.kernel_aggregate(q, s, n, f.astype(np.float64), kp, 0.3)
        with self.assertRaisesRegex(TypeError, "neighbors"):
            tf_custom_ops.kernel_aggregate(q, s, n.astype(np.int64), f, kp, 0.3)
        with self.assertRaisesRegex(ValueError, "influence"):
            tf_custom_ops.kernel_aggregate(q, s, n, f, kp, 0.3, influence="cubic")


if __name__ == "__main__":
    pytest.main([__file__])
