// KpconvMaxPool: the max over pooling neighbours of strided blocks, without the [M, H, C] gather.
//
// pooled[m, c] = max_h row(pools[m, h])[c], where row(s) is features[s] for s < Ns and the given
// shadow row for s == Ns. The standard-op formulation gathers an [M, H, C] tensor (hundreds of MB
// on the first layers), reduces it, and its gradient builds several more of that size before a
// segment sum; here the rows are read in place.
//
// The gradient follows TensorFlow's reduce_max gradient exactly: a row equal to the maximum gets
// (1 / number of equal rows) * grad, and each support sums its contributions in (m, h) order, as
// the segment sum of tf.gather's gradient does. Each thread owns a range of supports, so the
// result does not depend on the number of threads.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "cpu_loops.h"

namespace kpconv_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// Checks features [Ns, C], shadow [C], pools [M, H]; sets the pooled shape [M, C].
absl::Status PoolShapes(InferenceContext* c, ShapeHandle* pooled) {
  ShapeHandle f, shadow, pools;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &f));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &shadow));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &pools));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(f, 1), c->Dim(shadow, 0), &channels));
  *pooled = c->MakeShape({c->Dim(pools, 0), channels});
  return absl::OkStatus();
}

REGISTER_OP("KpconvMaxPool")
    .Input("features: float")
    .Input("shadow: float")
    .Input("pools: int32")
    .Output("pooled: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle pooled;
      TF_RETURN_IF_ERROR(PoolShapes(c, &pooled));
      c->set_output(0, pooled);
      return absl::OkStatus();
    })
    .Doc("Per pooling row, the channel-wise maximum of its neighbours' features (Ns = shadow).");

REGISTER_OP("KpconvMaxPoolGrad")
    .Input("features: float")
    .Input("shadow: float")
    .Input("pools: int32")
    .Input("pooled: float")
    .Input("grad: float")
    .Output("grad_features: float")
    .Output("grad_shadow: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle pooled, merged;
      TF_RETURN_IF_ERROR(PoolShapes(c, &pooled));
      TF_RETURN_IF_ERROR(c->Merge(pooled, c->input(3), &merged));
      TF_RETURN_IF_ERROR(c->Merge(merged, c->input(4), &merged));
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      return absl::OkStatus();
    })
    .Doc("Gradient of KpconvMaxPool w.r.t. the features and the shadow row.");

struct PoolInputs {
  const float* f;
  const float* shadow;
  const int32_t* pools;
  int64_t ns, c, m, h;

  const float* Row(int32_t s) const { return s == ns ? shadow : f + s * c; }
};

// Validates the inputs shared by both ops; false (with the error set) on bad input.
bool ValidatePool(OpKernelContext* ctx, PoolInputs* in) {
  const Tensor& f = ctx->input(0);
  const Tensor& shadow = ctx->input(1);
  const Tensor& pools = ctx->input(2);
  auto fail = [&](const absl::Status& status) {
    ctx->CtxFailure(status);
    return false;
  };
  if (f.dims() != 2)
    return fail(errors::InvalidArgument("features must have shape [Ns, C], got ",
                                        f.shape().DebugString()));
  if (!(shadow.dims() == 1 && shadow.dim_size(0) == f.dim_size(1)))
    return fail(errors::InvalidArgument("shadow must have shape [C] with C = ", f.dim_size(1),
                                        ", got ", shadow.shape().DebugString()));
  if (pools.dims() != 2)
    return fail(errors::InvalidArgument("pools must have shape [M, H], got ",
                                        pools.shape().DebugString()));
  in->f = f.flat<float>().data();
  in->shadow = shadow.flat<float>().data();
  in->pools = pools.flat<int32_t>().data();
  in->ns = f.dim_size(0);
  in->c = f.dim_size(1);
  in->m = pools.dim_size(0);
  in->h = pools.dim_size(1);
  const int64_t total = in->m * in->h;
  for (int64_t i = 0; i < total; ++i) {
    if (in->pools[i] < 0 || in->pools[i] > in->ns)
      return fail(errors::InvalidArgument("pools[", i / in->h, ", ", i % in->h, "] = ",
                                          in->pools[i], " is not in [0, ", in->ns,
                                          "] (Ns is the shadow index)"));
  }
  return true;
}

// Maxima of rows [m0, m1) into out [M, C]; an empty row gives -inf, as reduce_max over an empty
// axis does.
KPCONV_PER_ISA void PoolRows(const PoolInputs& in, int64_t m0, int64_t m1, float* out) {
  for (int64_t m = m0; m < m1; ++m) {
    float* __restrict o = out + m * in.c;
    const int32_t* row = in.pools + m * in.h;
    std::fill(o, o + in.c, -std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < in.h; ++j) {
      const float* __restrict x = in.Row(row[j]);
      for (int64_t c = 0; c < in.c; ++c) o[c] = std::max(o[c], x[c]);
    }
  }
}

// Per (m, c) of rows [m0, m1): (1 / number of rows equal to the max) * grad, the share of each
// maximal row, into share [M, C]; each row's smallest and largest index into row_min / row_max.
KPCONV_PER_ISA void Shares(const PoolInputs& in, const float* pooled, const float* grad, int64_t m0,
                           int64_t m1, float* share, int32_t* row_min, int32_t* row_max) {
  for (int64_t m = m0; m < m1; ++m) {
    float* __restrict count = share + m * in.c;
    const float* __restrict y = pooled + m * in.c;
    const int32_t* row = in.pools + m * in.h;
    std::fill(count, count + in.c, 0.0f);
    int32_t lo = static_cast<int32_t>(in.ns), hi = 0;
    for (int64_t j = 0; j < in.h; ++j) {
      const float* __restrict x = in.Row(row[j]);
      for (int64_t c = 0; c < in.c; ++c) count[c] += x[c] == y[c] ? 1.0f : 0.0f;
      lo = std::min(lo, row[j]);
      hi = std::max(hi, row[j]);
    }
    const float* __restrict g = grad + m * in.c;
    for (int64_t c = 0; c < in.c; ++c) count[c] = (1.0f / count[c]) * g[c];
    row_min[m] = lo;
    row_max[m] = hi;
  }
}

// Gradients of the targets [lo, hi) (index Ns is the shadow row): each sums its shares in (m, h)
// order. Rows whose indices all lie outside the range are skipped.
KPCONV_PER_ISA void SumShares(const PoolInputs& in, const float* pooled, const float* share,
                              const int32_t* row_min, const int32_t* row_max, int32_t lo,
                              int32_t hi, float* gf, float* gs) {
  const int64_t real_hi = std::min<int64_t>(hi, in.ns);
  if (lo < real_hi) std::fill(gf + lo * in.c, gf + real_hi * in.c, 0.0f);
  if (hi > in.ns) std::fill(gs, gs + in.c, 0.0f);
  for (int64_t m = 0; m < in.m; ++m) {
    if (row_max[m] < lo || row_min[m] >= hi) continue;
    const int32_t* row = in.pools + m * in.h;
    const float* __restrict y = pooled + m * in.c;
    const float* __restrict s = share + m * in.c;
    for (int64_t j = 0; j < in.h; ++j) {
      const int32_t t = row[j];
      if (t < lo || t >= hi) continue;
      const float* __restrict x = in.Row(t);
      float* __restrict dst = t == in.ns ? gs : gf + t * in.c;
      for (int64_t c = 0; c < in.c; ++c) dst[c] += x[c] == y[c] ? s[c] : 0.0f;
    }
  }
}

class MaxPoolOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    PoolInputs in;
    if (!ValidatePool(ctx, &in)) return;
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({in.m, in.c}), &out_t));
    float* out = out_t->flat<float>().data();
    ParallelFor(ctx, in.m, in.h * in.c,
                [&](int64_t m0, int64_t m1) { PoolRows(in, m0, m1, out); });
  }
};

class MaxPoolGradOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    PoolInputs in;
    if (!ValidatePool(ctx, &in)) return;
    const TensorShape expected({in.m, in.c});
    for (const int i : {3, 4}) {
      const char* name = i == 3 ? "pooled" : "grad";
      OP_REQUIRES(ctx, ctx->input(i).shape() == expected,
                  errors::InvalidArgument(name, " must have shape ", expected.DebugString(),
                                          ", got ", ctx->input(i).shape().DebugString()));
    }
    const float* pooled = ctx->input(3).flat<float>().data();
    const float* grad = ctx->input(4).flat<float>().data();
    Tensor *gf_t = nullptr, *gs_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &gf_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &gs_t));
    float* gf = gf_t->flat<float>().data();
    float* gs = gs_t->flat<float>().data();

    Tensor share_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, expected, &share_t));
    float* share = share_t.flat<float>().data();
    std::vector<int32_t> row_min(in.m), row_max(in.m);
    ParallelFor(ctx, in.m, 2 * in.h * in.c, [&](int64_t m0, int64_t m1) {
      Shares(in, pooled, grad, m0, m1, share, row_min.data(), row_max.data());
    });

    // The shadow row is target Ns.
    ForEachTargetRange(ctx, in.ns + 1, in.m * 2, in.m * in.h * 2 * in.c, [&](int64_t lo, int64_t hi) {
      SumShares(in, pooled, share, row_min.data(), row_max.data(), static_cast<int32_t>(lo),
                static_cast<int32_t>(hi), gf, gs);
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvMaxPool").Device(DEVICE_CPU), MaxPoolOp);
REGISTER_KERNEL_BUILDER(Name("KpconvMaxPoolGrad").Device(DEVICE_CPU), MaxPoolGradOp);

}  // namespace
}  // namespace kpconv_tf
