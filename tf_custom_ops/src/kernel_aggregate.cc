// KpconvKernelAggregate: the neighbour sum of a kernel point convolution, fused, with its gradient.
//
// For every query n and kernel point k it returns  sum_h w(n, h, k) * features[neighbors[n, h]],
// the [Nq, K, Din] tensor that the convolution then multiplies by its [K * Din, Dout] weights (a
// plain matmul, left to TensorFlow). Influences are those of kpconv_tf.ops: constant, linear,
// gaussian; sum or closest aggregation; rigid (shared [K, 3] kernel points) or deformable
// (per-query [Nq, K, 3] kernel points, neighbours outside every influence sphere dropped). Shadow
// neighbours (index Ns) carry zero features in the standard-op formulation, so they are skipped.
//
// Why fused: the standard-op formulation materialises the gathered [Nq, H, Din] features and
// contracts them with [Nq, H, K] influences in a batched matmul of tiny matrices (and the same
// twice more in the backward pass). Here each neighbour is read once and only its non-zero
// influences are accumulated: a linear influence reaches ~1-2 of the K kernel points, so most of
// that work disappears and no [Nq, H, *] tensor is ever stored. With geometry_gradients = false
// (fixed kernel points, points as data) the gradient op computes the features' gradient only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cloud_checks.h"
#include "cpu_loops.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kpconv_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Shape checks shared by both ops' shape functions; returns K and Din.
absl::Status AggregateShapes(InferenceContext* c, DimensionHandle* nq, DimensionHandle* k,
                             DimensionHandle* d) {
  ShapeHandle q, s, nb, f, kp, unused;
  bool deformable;
  TF_RETURN_IF_ERROR(c->GetAttr("deformable", &deformable));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &s));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &nb));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &f));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), deformable ? 3 : 2, &kp));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 0, &unused));
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 0), c->Dim(nb, 0), nq));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(s, 0), c->Dim(f, 0), &merged));
  *k = c->Dim(kp, deformable ? 1 : 0);
  *d = c->Dim(f, 1);
  return absl::OkStatus();
}

#define KPCONV_AGGREGATE_INPUTS_AND_ATTRS                               \
  Input("query_points: float")                                          \
      .Input("support_points: float")                                   \
      .Input("neighbors: int32")                                        \
      .Input("features: float")                                         \
      .Input("kernel_points: float")                                    \
      .Input("extent: float")                                           \
      .Attr("influence: {'constant', 'linear', 'gaussian'} = 'linear'") \
      .Attr("aggregation: {'sum', 'closest'} = 'sum'")                  \
      .Attr("deformable: bool = false")                                 \
      .Attr("geometry_gradients: bool = true")

REGISTER_OP("KpconvKernelAggregate")
    .KPCONV_AGGREGATE_INPUTS_AND_ATTRS.Output("aggregates: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle nq, k, d;
      TF_RETURN_IF_ERROR(AggregateShapes(c, &nq, &k, &d));
      c->set_output(0, c->MakeShape({nq, k, d}));
      return absl::OkStatus();
    })
    .Doc("Per query and kernel point, the influence-weighted sum of the neighbours' features.");

REGISTER_OP("KpconvKernelAggregateGrad")
    .KPCONV_AGGREGATE_INPUTS_AND_ATTRS.Input("grad: float")
    .Output("grad_features: float")
    .Output("grad_kernel_points: float")
    .Output("grad_centred: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle nq, k, d;
      TF_RETURN_IF_ERROR(AggregateShapes(c, &nq, &k, &d));
      ShapeHandle grad, nb;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 3, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &nb));
      bool geometry;
      TF_RETURN_IF_ERROR(c->GetAttr("geometry_gradients", &geometry));
      c->set_output(0, c->input(3));
      c->set_output(1, geometry ? c->input(4) : c->MakeShape({0}));
      c->set_output(2, geometry ? c->MakeShape({nq, c->Dim(nb, 1), 3}) : c->MakeShape({0}));
      return absl::OkStatus();
    })
    .Doc(
        "Gradient of KpconvKernelAggregate w.r.t. features, kernel points and centred neighbours.");

enum class Influence { kConstant, kLinear, kGaussian };

struct Params {
  Influence influence;
  bool closest;
  bool deformable;
  float extent;
  float extent2;      // extent^2, the deformable in-range test
  float gauss_denom;  // 2 sigma^2 + 1e-9 with sigma = 0.3 extent
  int64_t k;
};

// Validated inputs of either op.
struct Inputs {
  const float* q;
  const float* s;
  const int32_t* nb;
  const float* f;
  const float* kp;
  int64_t nq, ns, h, d;
  Params p;
  const float* KernelPoints(int64_t n) const { return p.deformable ? kp + n * p.k * 3 : kp; }
  // Support s relative to query n.
  void Centre(int64_t n, int64_t s_index, float c[3]) const {
    for (int a = 0; a < 3; ++a) c[a] = s[3 * s_index + a] - q[3 * n + a];
  }
};

// The kernel points of the current query in structure-of-arrays form, with per-neighbour scratch,
// padded to a multiple of kLanes with far-away points so the arithmetic loops have no remainder
// (a huge extent can still reach them: `real` masks them out). Rigid kernel points are loaded once; deformable ones by
// Query(n).
constexpr int64_t kLanes = 16;
constexpr float kFarAway = 1e15f;  // its squared distance stays finite in float

struct Kernel {
  const Inputs& in;
  int64_t padded;
  std::vector<float> x, y, z, d2, w, dw;
  // Per lane block, bit l set when kernel point block * kLanes + l has a non-zero influence (or
  // gradient) on the current neighbour; `real` has the bits of the kernel points that exist.
  std::vector<uint32_t> mask, real;
  explicit Kernel(const Inputs& inputs)
      : in(inputs),
        padded((in.p.k + kLanes - 1) / kLanes * kLanes),
        x(padded, kFarAway),
        y(padded, kFarAway),
        z(padded, kFarAway),
        d2(padded),
        w(padded),
        dw(padded),
        mask(padded / kLanes),
        real(padded / kLanes) {
    for (int64_t k = 0; k < in.p.k; ++k) real[k / kLanes] |= 1u << (k % kLanes);
    if (!in.p.deformable) Load(in.kp);
  }
  void Query(int64_t n) {
    if (in.p.deformable) Load(in.KernelPoints(n));
  }

 private:
  void Load(const float* kp) {
    for (int64_t k = 0; k < in.p.k; ++k) {
      x[k] = kp[3 * k];
      y[k] = kp[3 * k + 1];
      z[k] = kp[3 * k + 2];
    }
  }
};

// The helpers below are forced inline into the per-thread loops (see cpu_loops.h).

KPCONV_INLINE void LinearInfluence(const float* __restrict d2, const Params& p, bool with_grad, int64_t from,
                            int64_t to, float* __restrict w, float* __restrict dw) {
  for (int64_t k = from; k < to; ++k) {
    const float r = std::sqrt(std::max(d2[k], 1e-30f));
    const float v = 1.0f - r / p.extent;
    w[k] = std::max(v, 0.0f);
    dw[k] = (with_grad && v >= 0.0f && d2[k] >= 1e-30f) ? -0.5f / (r * p.extent) : 0.0f;
  }
}

// Lane masks (bit l for lane l of a 16-lane block), written in GCC's vector extension: plain loops
// (or scalar float compares) here are unrolled and left scalar once inlined into the
// per-neighbour loop, and this is the hottest spot of the sum.
typedef uint32_t LanesU32 __attribute__((vector_size(4 * kLanes)));
typedef float LanesF32 __attribute__((vector_size(4 * kLanes)));
typedef uint32_t HalfU32 __attribute__((vector_size(2 * kLanes)));
typedef uint32_t QuarterU32 __attribute__((vector_size(kLanes)));
typedef float HalfF32 __attribute__((vector_size(2 * kLanes)));
typedef float QuarterF32 __attribute__((vector_size(kLanes)));
static_assert(kLanes == 16, "the lane masks are written for 16 lanes");

// Lane l's 0/1 value moved to bit l, OR-ed together.
KPCONV_INLINE uint32_t PackLanes(LanesU32 ones) {
  const LanesU32 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const LanesU32 bits = ones << lane;
  const HalfU32 half = __builtin_shufflevector(bits, bits, 0, 1, 2, 3, 4, 5, 6, 7) |
                       __builtin_shufflevector(bits, bits, 8, 9, 10, 11, 12, 13, 14, 15);
  const QuarterU32 quarter =
      __builtin_shufflevector(half, half, 0, 1, 2, 3) | __builtin_shufflevector(half, half, 4, 5, 6, 7);
  return (quarter[0] | quarter[1]) | (quarter[2] | quarter[3]);
}

// Lanes where w or dw is non-zero.
KPCONV_INLINE uint32_t NonZeroMask(const float* __restrict w, const float* __restrict dw) {
  LanesU32 a, b;
  std::memcpy(&a, w, sizeof a);
  std::memcpy(&b, dw, sizeof b);
  // A non-zero magnitude (sign bit cleared) carries into bit 31 when 0x7fffffff is added.
  return PackLanes((((a | b) & 0x7fffffffu) + 0x7fffffffu) >> 31);
}

// Lanes where d2 < limit.
KPCONV_INLINE uint32_t BelowMask(const float* __restrict d2, float limit) {
  LanesF32 v;
  std::memcpy(&v, d2, sizeof v);
  return PackLanes(reinterpret_cast<LanesU32>(v < LanesF32{} + limit) >> 31);
}

// Influences w[k] of the kernel points on the centred neighbour c (and dw/d(d2) when `with_grad`),
// matching kpconv_tf.ops.influence_weights, with the kernel points that have a non-zero influence
// (or gradient) marked in kn->mask; w and dw are only meaningful where marked. Returns false when
// none is (deformable: also when the neighbour is outside every influence sphere). The loops
// have no data-dependent branch: a linear influence reaches one or two of the K kernel points in
// an unpredictable pattern, so all lanes are computed and the mask is a vector compare (a scalar
// square root for the few candidates alone measured slower, by its mispredicted branches).
KPCONV_INLINE bool Influences(const float* c, const Params& p, bool with_grad, Kernel* kn) {
  const int64_t num = p.k;
  float* __restrict d2 = kn->d2.data();
  float* __restrict w = kn->w.data();
  float* __restrict dw = kn->dw.data();
  const float* __restrict x = kn->x.data();
  const float* __restrict y = kn->y.data();
  const float* __restrict z = kn->z.data();
  uint32_t* mask = kn->mask.data();
  const uint32_t* real = kn->real.data();
  const int64_t padded = kn->padded;
  for (int64_t b = 0; b < padded; b += kLanes) {
    for (int64_t k = b; k < b + kLanes; ++k) {
      const float dx = c[0] - x[k], dy = c[1] - y[k], dz = c[2] - z[k];
      d2[k] = dx * dx + dy * dy + dz * dz;
    }
  }
  if (p.deformable) {
    uint32_t in_range = 0;
    for (int64_t b = 0; b < padded; b += kLanes)
      in_range |= BelowMask(d2 + b, p.extent2) & real[b / kLanes];
    if (!in_range) return false;
  }
  if (p.closest) {  // only the nearest kernel point (first on ties) keeps its influence
    int64_t first = 0;
    for (int64_t k = 1; k < num; ++k)
      if (d2[k] < d2[first]) first = k;
    switch (p.influence) {
      case Influence::kConstant:
        w[first] = p.deformable ? static_cast<float>(d2[first] < p.extent2) : 1.0f;
        dw[first] = 0.0f;
        break;
      case Influence::kLinear:
        LinearInfluence(d2, p, with_grad, first, first + 1, w, dw);
        break;
      case Influence::kGaussian:
        w[first] = std::exp(-d2[first] / p.gauss_denom);
        dw[first] = -w[first] / p.gauss_denom;
        break;
    }
    std::fill(mask, mask + padded / kLanes, 0u);
    const bool on = (w[first] != 0.0f) | (dw[first] != 0.0f);
    mask[first / kLanes] = static_cast<uint32_t>(on) << (first % kLanes);
    return on;
  }
  switch (p.influence) {
    case Influence::kConstant:
      for (int64_t k = 0; k < padded; ++k) {
        w[k] = p.deformable ? static_cast<float>(d2[k] < p.extent2) : 1.0f;
        dw[k] = 0.0f;
      }
      break;
    case Influence::kLinear:
      for (int64_t b = 0; b < padded; b += kLanes) LinearInfluence(d2, p, with_grad, b, b + kLanes, w, dw);
      break;
    case Influence::kGaussian:
      for (int64_t k = 0; k < padded; ++k) {
        w[k] = std::exp(-d2[k] / p.gauss_denom);
        dw[k] = -w[k] / p.gauss_denom;
      }
      break;
  }
  uint32_t any = 0;
  for (int64_t b = 0; b < padded; b += kLanes) {
    mask[b / kLanes] = NonZeroMask(w + b, dw + b) & real[b / kLanes];
    any |= mask[b / kLanes];
  }
  return any != 0;
}

// Calls visit(k) for every kernel point marked in kn.mask, in increasing k. `visit` should be an
// always_inline lambda, for the reason given above KPCONV_INLINE.
template <typename Visit>
KPCONV_INLINE void ForEachMarked(const Kernel& kn, Visit visit) {
  for (int64_t b = 0; b < kn.padded / kLanes; ++b)
    for (uint32_t m = kn.mask[b]; m; m &= m - 1) visit(b * kLanes + __builtin_ctz(m));
}

// Row helpers.
KPCONV_INLINE void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

KPCONV_INLINE float Dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  // Sixteen running sums, one per lane, added up as a tree: a single float sum (or a sequential
  // sum of the lanes) is a dependency chain the compiler may not reorder without -ffast-math.
  LanesF32 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    LanesF32 a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, y + i, sizeof b);
    acc += a * b;
  }
  const HalfF32 half = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                       __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
  const QuarterF32 quarter =
      __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
  float s = (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// Asks for the cache lines of x[0 .. n). Used where the loops below read memory in an order the
// hardware prefetcher does not follow: a query's [K, Din] block of the output gradient (read in
// neighbour order) and the feature rows of the next neighbours.
KPCONV_INLINE void Prefetch(const float* x, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(float)); b += 64) __builtin_prefetch(bytes + b);
}

// Forward sums of queries [begin, end) into out [Nq, K, Din].
KPCONV_PER_ISA void SumQueries(const Inputs& in, int64_t begin, int64_t end, float* out) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* w = kernel.w.data();
  for (int64_t n = begin; n < end; ++n) {
    float* agg = out + n * kn * in.d;
    std::fill(agg, agg + kn * in.d, 0.0f);
    kernel.Query(n);
    for (int64_t j = 0; j < in.h; ++j) {
      const int64_t s = in.nb[n * in.h + j];
      if (j + 4 < in.h) {
        const int64_t ahead = in.nb[n * in.h + j + 4];
        if (ahead != in.ns) Prefetch(in.f + ahead * in.d, in.d);
      }
      if (s == in.ns) continue;
      float c[3];
      in.Centre(n, s, c);
      if (!Influences(c, in.p, false, &kernel)) continue;
      ForEachMarked(kernel, [&](int64_t k) KPCONV_LAMBDA_INLINE {
        Axpy(w[k], in.f + s * in.d, agg + k * in.d, in.d);
      });
    }
  }
}

// Geometric gradients of queries [begin, end): centred-neighbour gradients into gc [Nq, H, 3]
// and kernel point gradients into gk [Nq, K, 3] (deformable) or summed into gshared [K, 3]
// (rigid, double).
KPCONV_PER_ISA void GeometryGradients(const Inputs& in, const float* grad, int64_t begin,
                                      int64_t end, float* gk, float* gc, double* gshared) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* dw = kernel.dw.data();
  for (int64_t n = begin; n < end; ++n) {
    if (n + 1 < end) Prefetch(grad + (n + 1) * kn * in.d, kn * in.d);
    const float* kp = in.KernelPoints(n);
    kernel.Query(n);
    float* gkp = in.p.deformable ? gk + n * kn * 3 : nullptr;
    if (gkp) std::fill(gkp, gkp + kn * 3, 0.0f);
    for (int64_t j = 0; j < in.h; ++j) {
      float* gy = gc + (n * in.h + j) * 3;
      gy[0] = gy[1] = gy[2] = 0.0f;
      const int64_t s = in.nb[n * in.h + j];
      if (s == in.ns) continue;
      float c[3];
      in.Centre(n, s, c);
      if (!Influences(c, in.p, true, &kernel)) continue;
      ForEachMarked(kernel, [&](int64_t k) KPCONV_LAMBDA_INLINE {
        if (dw[k] == 0.0f) return;
        const float g_d2 = Dot(grad + (n * kn + k) * in.d, in.f + s * in.d, in.d) * dw[k];
        for (int a = 0; a < 3; ++a) {
          const float g = 2.0f * g_d2 * (c[a] - kp[3 * k + a]);
          gy[a] += g;
          if (gkp)
            gkp[3 * k + a] -= g;
          else
            gshared[3 * k + a] -= g;
        }
      });
    }
  }
}

// Feature gradients of supports [s_begin, s_end) into gf [Ns, Din]. Each support's row is summed
// over the (query, column) entries that read it in `neighbors` order (queries ascending, then
// columns), the order in which this query-major pass meets them: the sums do not depend on the
// thread count or on how clouds are batched together, and grad is read query by query (its
// [K, Din] rows are K times larger than a feature row). row_min / row_max [Nq]: the smallest and
// largest support of each row, so that rows outside the range are skipped without reading them.
KPCONV_PER_ISA void FeatureGradients(const Inputs& in, const float* grad, const int32_t* row_min,
                                     const int32_t* row_max, int64_t s_begin, int64_t s_end,
                                     float* gf) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* w = kernel.w.data();
  std::fill(gf + s_begin * in.d, gf + s_end * in.d, 0.0f);
  const auto touches = [&](int64_t n) { return row_max[n] >= s_begin && row_min[n] < s_end; };
  for (int64_t n = 0; n < in.nq; ++n) {
    if (!touches(n)) continue;
    if (n + 1 < in.nq && touches(n + 1)) Prefetch(grad + (n + 1) * kn * in.d, kn * in.d);
    kernel.Query(n);
    for (int64_t j = 0; j < in.h; ++j) {
      const int64_t s = in.nb[n * in.h + j];
      if (s < s_begin || s >= s_end) continue;  // the shadow index Ns is never in range
      float c[3];
      in.Centre(n, s, c);
      if (!Influences(c, in.p, false, &kernel)) continue;
      float* row = gf + s * in.d;
      ForEachMarked(kernel, [&](int64_t k) KPCONV_LAMBDA_INLINE {
        Axpy(w[k], grad + (n * kn + k) * in.d, row, in.d);
      });
    }
  }
}

class AggregateBase : public OpKernel {
 public:
  explicit AggregateBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string influence, aggregation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("influence", &influence));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("aggregation", &aggregation));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("deformable", &deformable_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("geometry_gradients", &geometry_gradients_));
    influence_ = influence == "constant" ? Influence::kConstant
                 : influence == "linear" ? Influence::kLinear
                                         : Influence::kGaussian;
    closest_ = aggregation == "closest";
  }

 protected:
  // Checks shapes, extent and every neighbour index; fills `in`. Returns false on error.
  bool Validate(OpKernelContext* ctx, Inputs* in) {
    const Tensor& q = ctx->input(0);
    const Tensor& s = ctx->input(1);
    const Tensor& nb = ctx->input(2);
    const Tensor& f = ctx->input(3);
    const Tensor& kp = ctx->input(4);
    const Tensor& extent = ctx->input(5);
    auto fail = [&](const absl::Status& status) {
      ctx->CtxFailure(status);
      return false;
    };
    if (!(q.dims() == 2 && q.dim_size(1) == 3))
      return fail(errors::InvalidArgument("query_points must have shape [Nq, 3], got ",
                                          q.shape().DebugString()));
    if (!(s.dims() == 2 && s.dim_size(1) == 3))
      return fail(errors::InvalidArgument("support_points must have shape [Ns, 3], got ",
                                          s.shape().DebugString()));
    if (!(nb.dims() == 2 && nb.dim_size(0) == q.dim_size(0)))
      return fail(errors::InvalidArgument("neighbors must have shape [Nq, H] with Nq = ",
                                          q.dim_size(0), ", got ", nb.shape().DebugString()));
    if (!(f.dims() == 2 && f.dim_size(0) == s.dim_size(0)))
      return fail(errors::InvalidArgument("features must have shape [Ns, Din] with Ns = ",
                                          s.dim_size(0), ", got ", f.shape().DebugString()));
    const bool kp_ok =
        deformable_ ? (kp.dims() == 3 && kp.dim_size(0) == q.dim_size(0) && kp.dim_size(2) == 3)
                    : (kp.dims() == 2 && kp.dim_size(1) == 3);
    if (!kp_ok || kp.dim_size(kp.dims() - 2) < 1)
      return fail(errors::InvalidArgument("kernel_points must have shape ",
                                          deformable_ ? "[Nq, K, 3] (deformable)" : "[K, 3]",
                                          " with K >= 1, got ", kp.shape().DebugString()));
    double extent_value;
    if (!CheckPositiveScalar(ctx, extent, "extent", &extent_value)) return false;
    const float e = static_cast<float>(extent_value);  // exact: it was read from a float
    in->q = q.flat<float>().data();
    in->s = s.flat<float>().data();
    in->nb = nb.flat<int32_t>().data();
    in->f = f.flat<float>().data();
    in->kp = kp.flat<float>().data();
    in->nq = q.dim_size(0);
    in->ns = s.dim_size(0);
    in->h = nb.dim_size(1);
    in->d = f.dim_size(1);
    in->p.influence = influence_;
    in->p.closest = closest_;
    in->p.deformable = deformable_;
    in->p.extent = e;
    in->p.extent2 = e * e;
    const float sigma = 0.3f * e;
    in->p.gauss_denom = 2.0f * (sigma * sigma) + 1e-9f;
    in->p.k = deformable_ ? kp.dim_size(1) : kp.dim_size(0);
    const int64_t total = in->nq * in->h;
    for (int64_t i = 0; i < total; ++i) {
      if (in->nb[i] < 0 || in->nb[i] > in->ns)
        return fail(errors::InvalidArgument("neighbors[", i / in->h, ", ", i % in->h,
                                            "] = ", in->nb[i], " is not in [0, ", in->ns,
                                            "] (Ns is the shadow index)"));
    }
    return true;
  }

  Influence influence_;
  bool closest_;
  bool deformable_;
  bool geometry_gradients_;
};

class KernelAggregateOp : public AggregateBase {
 public:
  using AggregateBase::AggregateBase;

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    if (!Validate(ctx, &in)) return;
    const int64_t kn = in.p.k;
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({in.nq, kn, in.d}), &out_t));
    float* out = out_t->flat<float>().data();
    const int64_t cost = in.h * (kn * 12 + 2 * in.d) + kn * in.d;
    ParallelFor(ctx, in.nq, cost,
                [&](int64_t begin, int64_t end) { SumQueries(in, begin, end, out); });
  }
};

class KernelAggregateGradOp : public AggregateBase {
 public:
  using AggregateBase::AggregateBase;

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    if (!Validate(ctx, &in)) return;
    const int64_t kn = in.p.k;
    const Tensor& grad_t = ctx->input(6);
    OP_REQUIRES(ctx,
                grad_t.dims() == 3 && grad_t.dim_size(0) == in.nq && grad_t.dim_size(1) == kn &&
                    grad_t.dim_size(2) == in.d,
                errors::InvalidArgument("grad must have shape [", in.nq, ", ", kn, ", ", in.d,
                                        "], got ", grad_t.shape().DebugString()));
    const float* grad = grad_t.flat<float>().data();
    const bool geometry = geometry_gradients_;
    Tensor *gf_t = nullptr, *gk_t = nullptr, *gc_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(3).shape(), &gf_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, geometry ? ctx->input(4).shape() : TensorShape({0}),
                                             &gk_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, geometry ? TensorShape({in.nq, in.h, 3}) : TensorShape({0}), &gc_t));
    float* gf = gf_t->flat<float>().data();
    float* gk = gk_t->flat<float>().data();
    float* gc = gc_t->flat<float>().data();

    // 1. With geometry: per query, the gradients of the centred neighbours and kernel points.
    // Shared (rigid) kernel points are summed per block of queries, in double, then over blocks.
    if (geometry) {
      const int64_t num_blocks = std::min<int64_t>(in.nq, 256);
      const int64_t block = num_blocks ? (in.nq + num_blocks - 1) / num_blocks : 0;
      std::vector<double> kp_partial(in.p.deformable ? 0 : num_blocks * kn * 3, 0.0);
      ParallelFor(ctx, num_blocks, block * in.h * (kn * 16 + 2 * in.d), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          double* gshared = kp_partial.empty() ? nullptr : kp_partial.data() + b * kn * 3;
          GeometryGradients(in, grad, b * block, std::min(in.nq, (b + 1) * block), gk, gc, gshared);
        }
      });
      if (!in.p.deformable) {
        for (int64_t i = 0; i < kn * 3; ++i) {
          double total = 0.0;
          for (int64_t b = 0; b < num_blocks; ++b) total += kp_partial[b * kn * 3 + i];
          gk[i] = static_cast<float>(total);
        }
      }
    }

    // 2. The feature gradient, per range of supports (see FeatureGradients). The ranges are
    // large enough that the scan over the row bounds stays small against the sums.
    std::vector<int32_t> row_min(in.nq), row_max(in.nq);
    ParallelFor(ctx, in.nq, 2 * in.h, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        int32_t lo = static_cast<int32_t>(in.ns), hi = -1;
        for (int64_t j = 0; j < in.h; ++j) {
          const int32_t s = in.nb[n * in.h + j];
          const bool real = s != in.ns;
          lo = std::min(lo, real ? s : lo);
          hi = std::max(hi, real ? s : hi);
        }
        row_min[n] = lo;
        row_max[n] = hi;
      }
    });
    ForEachTargetRange(ctx, in.ns, in.nq * 2, in.nq * in.h * (kn * 12 + 2 * in.d),
                       [&](int64_t lo, int64_t hi) {
                         FeatureGradients(in, grad, row_min.data(), row_max.data(), lo, hi, gf);
                       });
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvKernelAggregate").Device(DEVICE_CPU), KernelAggregateOp);
REGISTER_KERNEL_BUILDER(Name("KpconvKernelAggregateGrad").Device(DEVICE_CPU),
                        KernelAggregateGradOp);

}  // namespace
}  // namespace kpconv_tf
