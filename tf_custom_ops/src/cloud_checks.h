// Input validation shared by the kpconv-tf ops. Every check reports the argument by name.
#ifndef KPCONV_TF_CLOUD_CHECKS_H_
#define KPCONV_TF_CLOUD_CHECKS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace kpconv_tf {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShapeUtils;
namespace errors = ::tensorflow::errors;

// Points must be a finite float32 [N, 3] matrix.
inline bool CheckPoints(OpKernelContext* ctx, const Tensor& t, const char* name) {
  if (!(t.dims() == 2 && t.dim_size(1) == 3)) {
    ctx->CtxFailure(
        errors::InvalidArgument(name, " must have shape [N, 3], got ", t.shape().DebugString()));
    return false;
  }
  auto flat = t.flat<float>();
  for (int64_t i = 0; i < flat.size(); ++i) {
    if (!std::isfinite(flat(i))) {
      ctx->CtxFailure(
          errors::InvalidArgument(name, " has a NaN or infinite coordinate at row ", i / 3));
      return false;
    }
  }
  return true;
}

// Lengths must be a non-negative int32 vector summing to `total`. Fills the cloud start offsets.
inline bool CheckLengths(OpKernelContext* ctx, const Tensor& t, int64_t total, const char* name,
                         const char* points_name, std::vector<int64_t>* starts) {
  if (!TensorShapeUtils::IsVector(t.shape())) {
    ctx->CtxFailure(
        errors::InvalidArgument(name, " must be a vector [B], got ", t.shape().DebugString()));
    return false;
  }
  auto v = t.vec<int32_t>();
  starts->assign(v.size() + 1, 0);
  for (int64_t b = 0; b < v.size(); ++b) {
    if (v(b) < 0) {
      ctx->CtxFailure(errors::InvalidArgument(name, "[", b, "] is negative (", v(b), ")"));
      return false;
    }
    (*starts)[b + 1] = (*starts)[b] + v(b);
  }
  if ((*starts)[v.size()] != total) {
    ctx->CtxFailure(errors::InvalidArgument(name, " sums to ", (*starts)[v.size()], " but ",
                                            points_name, " has ", total, " points"));
    return false;
  }
  return true;
}

inline bool CheckPositiveScalar(OpKernelContext* ctx, const Tensor& t, const char* name,
                                double* value) {
  if (!TensorShapeUtils::IsScalar(t.shape())) {
    ctx->CtxFailure(
        errors::InvalidArgument(name, " must be a scalar, got ", t.shape().DebugString()));
    return false;
  }
  *value = static_cast<double>(t.scalar<float>()());
  if (!(std::isfinite(*value) && *value > 0)) {
    ctx->CtxFailure(errors::InvalidArgument(name, " must be finite and > 0, got ", *value));
    return false;
  }
  return true;
}

// Per-axis min and max of n points (zeros when n = 0).
inline void BoundingBox(const float* points, int64_t n, double lo[3], double hi[3]) {
  for (int a = 0; a < 3; ++a) lo[a] = hi[a] = n ? points[a] : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int a = 0; a < 3; ++a) {
      const double x = points[3 * i + a];
      lo[a] = x < lo[a] ? x : lo[a];
      hi[a] = x > hi[a] ? x : hi[a];
    }
  }
}

// Integer cell coordinates of a cloud on a grid of size `cell` anchored at floor(min / cell) *
// cell. Fails (naming `dl_name`) when the grid would have too many cells per axis for 64-bit keys.
struct Grid {
  double origin[3];
  int64_t dims[3];
  double cell;

  inline int64_t Coord(double x, int axis) const {
    // Clamping is safe for searches because cells are at least one radius wide: a query outside
    // the grid only ever has neighbours in the border cells.
    const double c = std::floor((x - origin[axis]) / cell);
    if (!(c > 0)) return 0;
    return c >= static_cast<double>(dims[axis]) ? dims[axis] - 1 : static_cast<int64_t>(c);
  }
  inline int64_t Key(int64_t i, int64_t j, int64_t k) const {
    return i + dims[0] * (j + dims[1] * k);
  }
  inline int64_t KeyOf(const float* p) const {
    return Key(Coord(p[0], 0), Coord(p[1], 1), Coord(p[2], 2));
  }
};

inline bool MakeGrid(OpKernelContext* ctx, const float* points, int64_t n, double cell,
                     const char* dl_name, Grid* grid) {
  double lo[3], hi[3];
  BoundingBox(points, n, lo, hi);
  grid->cell = cell;
  double cells = 1.0;
  for (int a = 0; a < 3; ++a) {
    grid->origin[a] = std::floor(lo[a] / cell) * cell;
    // A cell below the coordinates' precision can round the origin past every point (which then
    // differ by less than that precision): one cell, which Coord clamps them into.
    const double span = std::max(1.0, std::floor((hi[a] - grid->origin[a]) / cell) + 1.0);
    cells *= span;
    if (!(span < 2e6) || !(cells < 4e18)) {
      ctx->CtxFailure(errors::InvalidArgument(dl_name, " = ", cell,
                                              " is too small for the cloud extent (", hi[a] - lo[a],
                                              "): the grid would overflow its cell keys"));
      return false;
    }
    grid->dims[a] = static_cast<int64_t>(span);
  }
  return true;
}

}  // namespace kpconv_tf

#endif  // KPCONV_TF_CLOUD_CHECKS_H_
