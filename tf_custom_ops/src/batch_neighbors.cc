// KpconvBatchNeighbors: radius neighbours of stacked clouds, rows sorted by distance.
//
// Search structure: per cloud, the supports are bucketed on a grid of cell size = radius (cells
// sorted by key with a counting sort, supports stored contiguously per cell), so a query scans
// 3 x 3 runs of 3 cells. Queries are processed grouped by their cell: the group's candidates are
// gathered once into contiguous arrays, then each query computes its distances in one
// vectorisable loop, compacts the hits without branches and sorts them by ranking 32-bit keys.
// Grid rather than KD-tree, by measurement on W1 layer 0 (111,480 queries in their own clouds,
// r = 0.05, 2 cores, medians, benchmarks/bench_ops.py): this grid ~28 ms; scipy cKDTree
// (workers=-1) ~230 ms for k nearest within r, ~520 ms for query_ball_point; the original
// release's nanoflann op 139 ms. Surface clouds
// subsampled at ~r/2.5 put a bounded number of points in each cell, so the 27-cell scan has few
// wasted candidates and no tree descent. When the grid would be much larger than the cloud (tiny
// radius), cell lookups fall back to a binary search over the occupied cells, so memory stays
// O(N) for any radius.
//
// Distances: squared distances are computed in double from the float32 coordinates and compared
// with radius^2 in double (distance <= radius), so a float64 brute force reproduces them exactly.
// Ties are broken by support index. The build passes -ffp-contract=off so that no FMA fusion
// changes the rounding of d2.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define KPCONV_X86 1
// Vectorised clones picked at load time by the CPU's features.
#define KPCONV_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KPCONV_SIMD_CLONES
#endif

#include "cloud_checks.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kpconv_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("KpconvBatchNeighbors")
    .Input("queries: float")
    .Input("supports: float")
    .Input("q_lengths: int32")
    .Input("s_lengths: int32")
    .Input("radius: float")
    .Input("max_neighbors: int32")
    .Output("neighbors: int32")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle q, s, ql, sl, unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &q));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &s));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &ql));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &sl));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 0, &unused));
      c->set_output(0, c->Matrix(c->Dim(q, 0), c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc("Radius neighbours per cloud of stacked clouds; rows sorted by distance, padded with Ns.");

// Cells are radius / kCellsPerRadius wide. Half-radius cells scan less empty volume (15.6 r^3
// instead of 27 r^3) but measured 2.5x slower on W1 layer 0 with an earlier per-query search
// (170 ms vs 67 ms, 2 cores): the grid outgrows the dense cell table, lookups become binary
// searches, and cell groups shrink to about one query.
constexpr double kCellsPerRadius = 1.0;

// Query groups are cut into work units of at most this many queries.
constexpr int64_t kUnitQueries = 512;

// Rows of at most this many hits are sorted by ranking (the hit number takes 7 key bits); longer
// ones with std::sort.
constexpr int64_t kRankSortMax = 128;

// Supports of one cloud sorted by cell, with the occupied cells' keys and their start offsets.
struct CellIndex {
  Grid grid;
  std::vector<int32_t> ids;         // stacked support indices sorted by cell key
  std::vector<double> x, y, z;      // their coordinates (exact float -> double), in that order
  std::vector<int64_t> cell_of;     // cell key of each sorted support
  std::vector<int64_t> keys;        // without cell_start: occupied cell keys, ascending,
  std::vector<int64_t> starts;      // and the run start of each in `ids` (+ end)
  std::vector<int32_t> cell_start;  // when affordable: start in `ids` of every cell key (+ end)
  bool use_dense = false;
  int64_t reach = 1;                // cells to scan on each side of the query's cell

  // Range [begin, end) in `ids` of the cells with keys in [lo_key, hi_key] (same j, k).
  inline void Range(int64_t lo_key, int64_t hi_key, int64_t* begin, int64_t* end) const {
    if (use_dense) {
      *begin = cell_start[lo_key];
      *end = cell_start[hi_key + 1];
      return;
    }
    const auto lo = std::lower_bound(keys.begin(), keys.end(), lo_key);
    const auto hi = std::upper_bound(lo, keys.end(), hi_key);
    *begin = starts[lo - keys.begin()];
    *end = starts[hi - keys.begin()];
  }
};

// Cell keys of n points, and their order sorted by key (stable): a counting sort over the dense
// key range when it is affordable (then `cell_start`, if given, receives the start of every cell
// in that order, plus the end), a comparison sort otherwise.
void SortByCell(const float* pts, int64_t n, const Grid& grid, bool dense, std::vector<int64_t>* key,
                std::vector<int32_t>* order, std::vector<int32_t>* cell_start = nullptr) {
  key->resize(n);
  order->resize(n);
  for (int64_t i = 0; i < n; ++i) (*key)[i] = grid.KeyOf(pts + 3 * i);
  if (dense) {
    const int64_t cells = grid.dims[0] * grid.dims[1] * grid.dims[2];
    std::vector<int32_t> count(cells + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++count[(*key)[i] + 1];
    for (int64_t c = 0; c < cells; ++c) count[c + 1] += count[c];
    if (cell_start) *cell_start = count;
    for (int64_t i = 0; i < n; ++i) (*order)[count[(*key)[i]]++] = static_cast<int32_t>(i);
    return;
  }
  for (int64_t i = 0; i < n; ++i) (*order)[i] = static_cast<int32_t>(i);
  std::stable_sort(order->begin(), order->end(),
                   [&](int32_t a, int32_t b) { return (*key)[a] < (*key)[b]; });
}

void BuildIndex(const float* pts, int64_t first, int64_t n, const Grid& grid, int64_t reach,
                CellIndex* index) {
  index->grid = grid;
  index->reach = reach;
  const int64_t total_cells = grid.dims[0] * grid.dims[1] * grid.dims[2];
  index->use_dense = total_cells <= 16 * n + 4096;  // the dense table costs O(cells) per call
  std::vector<int64_t> key;
  std::vector<int32_t> order;
  SortByCell(pts + 3 * first, n, grid, index->use_dense, &key, &order, &index->cell_start);
  index->ids.resize(n);
  index->x.resize(n);
  index->y.resize(n);
  index->z.resize(n);
  index->cell_of.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t o = order[i];
    index->ids[i] = static_cast<int32_t>(first + o);
    const float* p = pts + 3 * (first + o);
    index->x[i] = p[0];
    index->y[i] = p[1];
    index->z[i] = p[2];
    index->cell_of[i] = key[o];
    if (!index->use_dense && (i == 0 || key[o] != key[order[i - 1]])) {
      index->keys.push_back(key[o]);
      index->starts.push_back(i);
    }
  }
  index->starts.push_back(n);
}

// Squared distances of n candidates to p, and the positions of those within r2, compacted in
// order; returns their number. `hit` needs 4 slots of slack. The test is unpredictable, hence
// the branch-free compaction.
int64_t HitsScalar(const double* xs, const double* ys, const double* zs, int64_t n, double px,
                   double py, double pz, double r2, double* d2, int32_t* hit) {
  int64_t m = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double dx = xs[c] - px, dy = ys[c] - py, dz = zs[c] - pz;
    d2[c] = dx * dx + dy * dy + dz * dz;
    hit[m] = static_cast<int32_t>(c);
    m += d2[c] <= r2;
  }
  return m;
}

#ifdef KPCONV_X86
// Lane positions of the set bits of a 4-bit mask, packed first: compaction without AVX-512.
struct CompressTable {
  alignas(16) int32_t lanes[16][4];
  CompressTable() {
    for (int mask = 0; mask < 16; ++mask) {
      int k = 0;
      for (int b = 0; b < 4; ++b)
        if (mask & (1 << b)) lanes[mask][k++] = b;
      while (k < 4) lanes[mask][k++] = 0;
    }
  }
};
const CompressTable kCompress;

// HitsScalar, 4 candidates per step (same operations in the same order, so the same d2 bits).
__attribute__((target("avx2,popcnt")))
int64_t HitsAvx2(const double* xs, const double* ys, const double* zs, int64_t n, double px,
                 double py, double pz, double r2, double* d2, int32_t* hit) {
  const __m256d vx = _mm256_set1_pd(px), vy = _mm256_set1_pd(py), vz = _mm256_set1_pd(pz);
  const __m256d vr2 = _mm256_set1_pd(r2);
  int64_t m = 0, c = 0;
  for (; c + 4 <= n; c += 4) {
    const __m256d dx = _mm256_sub_pd(_mm256_loadu_pd(xs + c), vx);
    const __m256d dy = _mm256_sub_pd(_mm256_loadu_pd(ys + c), vy);
    const __m256d dz = _mm256_sub_pd(_mm256_loadu_pd(zs + c), vz);
    const __m256d d = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(dx, dx), _mm256_mul_pd(dy, dy)),
                                    _mm256_mul_pd(dz, dz));
    _mm256_storeu_pd(d2 + c, d);
    const int mask = _mm256_movemask_pd(_mm256_cmp_pd(d, vr2, _CMP_LE_OQ));
    const __m128i lanes = _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress.lanes[mask]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hit + m),
                     _mm_add_epi32(lanes, _mm_set1_epi32(static_cast<int32_t>(c))));
    m += __builtin_popcount(mask);
  }
  const int64_t tail = HitsScalar(xs + c, ys + c, zs + c, n - c, px, py, pz, r2, d2 + c, hit + m);
  for (int64_t t = m; t < m + tail; ++t) hit[t] += static_cast<int32_t>(c);
  return m + tail;
}

#endif  // KPCONV_X86

using HitsFn = int64_t (*)(const double*, const double*, const double*, int64_t, double, double,
                           double, double, double*, int32_t*);

// The AVX2 path unless the CPU lacks it or KPCONV_TF_NO_SIMD is set (tests use it to check the
// portable path).
HitsFn ChooseHits() {
#ifdef KPCONV_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
      std::getenv("KPCONV_TF_NO_SIMD") == nullptr)
    return HitsAvx2;
#endif
  return HitsScalar;
}

// Sorts m unique non-negative int32 keys by counting each one's rank: branch-free, 8 lanes per
// AVX2 compare, several times faster than a comparison sort on the short rows of radius searches.
// `keys` is padded to `padded` (a multiple of 8) with INT32_MAX.
KPCONV_SIMD_CLONES
void RankSort(const int32_t* __restrict keys, int64_t m, int64_t padded, int32_t* __restrict sorted) {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t ki = keys[i];
    int32_t rank = 0;
    for (int64_t j = 0; j < padded; ++j) rank += keys[j] < ki;
    sorted[rank] = ki;
  }
}

// Per-thread buffers of the search.
struct Scratch {
  std::vector<double> cx, cy, cz, d2;  // candidates of the current cell group, their distances
  std::vector<int32_t> cid, hit;       // candidates' support indices, positions of the hits
  std::vector<int32_t> keys, ranked;   // hits as (truncated float distance bits | hit number) keys
  std::vector<int32_t> sorted;         // candidate positions of the hits in distance order
  std::vector<int64_t> wide;           // keys of rows too long for 32-bit keys
  void Reserve(int64_t n) {
    if (static_cast<int64_t>(cx.size()) >= n) return;
    const int64_t m = 2 * n;
    for (auto* v : {&cx, &cy, &cz, &d2}) v->resize(m);
    cid.resize(m);
    hit.resize(m + 4);
    keys.resize(m + 8);
    ranked.resize(m + 8);
    sorted.resize(m);
  }
};

// Where each query's sorted neighbours were stored.
struct Placement {
  std::vector<int32_t> count, unit;
  std::vector<int64_t> offset;
};

// Searches the queries order[begin, end) of one cloud (sorted by their cell `qkey`), appending
// their rows to `out`.
void SearchUnit(const float* q, const CellIndex& idx, const int32_t* order, const int64_t* qkey,
                int64_t begin, int64_t end, double r2, int64_t max_neighbors, int32_t unit,
                Scratch* sc, std::vector<int32_t>* out, Placement* placed) {
  static const HitsFn hits = ChooseHits();
  const Grid& g = idx.grid;
  const int64_t reach = idx.reach;
  for (int64_t a = begin; a < end;) {
    int64_t e = a + 1;
    while (e < end && qkey[e] == qkey[a]) ++e;
    const int64_t key = qkey[a];
    const int64_t ci = key % g.dims[0], cj = (key / g.dims[0]) % g.dims[1];
    const int64_t ck = key / (g.dims[0] * g.dims[1]);
    const int64_t i0 = std::max<int64_t>(ci - reach, 0), i1 = std::min(ci + reach, g.dims[0] - 1);
    int64_t nc = 0;
    for (int64_t k = std::max<int64_t>(ck - reach, 0); k <= std::min(ck + reach, g.dims[2] - 1); ++k) {
      for (int64_t j = std::max<int64_t>(cj - reach, 0); j <= std::min(cj + reach, g.dims[1] - 1); ++j) {
        int64_t b0, b1;
        idx.Range(g.Key(i0, j, k), g.Key(i1, j, k), &b0, &b1);
        sc->Reserve(nc + b1 - b0);
        for (int64_t t = b0, c = nc; t < b1; ++t, ++c) {  // one pass (short runs: no memmove calls)
          sc->cx[c] = idx.x[t];
          sc->cy[c] = idx.y[t];
          sc->cz[c] = idx.z[t];
          sc->cid[c] = idx.ids[t];
        }
        nc += b1 - b0;
      }
    }
    sc->Reserve(nc);
    const double* d2 = sc->d2.data();
    const int32_t* cid = sc->cid.data();
    int32_t* hit = sc->hit.data();
    int32_t* keys = sc->keys.data();
    int32_t* ranked = sc->ranked.data();
    int32_t* sorted = sc->sorted.data();
    const auto exact_less = [&](int32_t u, int32_t v) {  // distance, then support index
      return d2[u] < d2[v] || (d2[u] == d2[v] && cid[u] < cid[v]);
    };
    for (int64_t t = a; t < e; ++t) {
      const int32_t qi = order[t];
      const float* p = q + 3 * qi;
      const int64_t m = hits(sc->cx.data(), sc->cy.data(), sc->cz.data(), nc, p[0], p[1], p[2], r2,
                             sc->d2.data(), hit);
      if (m <= kRankSortMax) {
        // Keys: float(d2) bits (monotone in d2) with the low 7 mantissa bits replaced by the hit
        // number, so they are unique and in distance order up to those bits; runs that agree on
        // the rest are then ordered exactly.
        for (int64_t h = 0; h < m; ++h) {
          const float f = static_cast<float>(d2[hit[h]]);
          int32_t bits;
          std::memcpy(&bits, &f, sizeof(bits));
          keys[h] = (bits & ~0x7F) | static_cast<int32_t>(h);
        }
        const int64_t padded = (m + 7) & ~int64_t{7};
        std::fill(keys + m, keys + padded, INT32_MAX);
        RankSort(keys, m, padded, ranked);
        for (int64_t h = 0; h < m; ++h) sorted[h] = hit[ranked[h] & 0x7F];
        for (int64_t h = 0; h < m;) {
          int64_t f = h + 1;
          while (f < m && ((ranked[f] ^ ranked[h]) >> 7) == 0) ++f;
          if (f - h > 1) std::sort(sorted + h, sorted + f, exact_less);
          h = f;
        }
      } else {  // long rows: sort 64-bit (float bits, hit number) keys, then equal-float runs exactly
        std::vector<int64_t>& wide = sc->wide;
        wide.resize(m);
        for (int64_t h = 0; h < m; ++h) {
          const float f = static_cast<float>(d2[hit[h]]);
          int32_t bits;
          std::memcpy(&bits, &f, sizeof(bits));
          wide[h] = (static_cast<int64_t>(bits) << 32) | h;
        }
        std::sort(wide.begin(), wide.end());
        for (int64_t h = 0; h < m; ++h) sorted[h] = hit[static_cast<int32_t>(wide[h])];
        for (int64_t h = 0; h < m;) {
          int64_t f = h + 1;
          while (f < m && (wide[f] >> 32) == (wide[h] >> 32)) ++f;
          if (f - h > 1) std::sort(sorted + h, sorted + f, exact_less);
          h = f;
        }
      }
      const int64_t keep = max_neighbors > 0 ? std::min<int64_t>(m, max_neighbors) : m;
      placed->count[qi] = static_cast<int32_t>(keep);
      placed->unit[qi] = unit;
      placed->offset[qi] = static_cast<int64_t>(out->size());
      out->resize(out->size() + keep);
      int32_t* row = out->data() + placed->offset[qi];
      for (int64_t h = 0; h < keep; ++h) row[h] = cid[sorted[h]];
    }
    a = e;
  }
}

// The search grid of one cloud of n supports: cells one radius wide, or wider when needed to keep
// per-axis counts representable (then more candidates are scanned, results are unchanged).
Grid SearchGrid(const float* pts, int64_t n, double radius) {
  double lo[3], hi[3];
  BoundingBox(pts, n, lo, hi);
  for (double cell = radius / kCellsPerRadius;; cell *= 4.0) {
    Grid g;
    g.cell = cell;
    bool ok = true;
    for (int a = 0; a < 3; ++a) {
      g.origin[a] = std::floor(lo[a] / cell) * cell;
      const double span = std::floor((hi[a] - g.origin[a]) / cell) + 1.0;
      ok = ok && span < 1e6;
      g.dims[a] = ok ? static_cast<int64_t>(span) : 1;
    }
    if (ok) return g;
  }
}

class BatchNeighborsOp : public OpKernel {
 public:
  explicit BatchNeighborsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& queries = ctx->input(0);
    const Tensor& supports = ctx->input(1);
    if (!CheckPoints(ctx, queries, "queries") || !CheckPoints(ctx, supports, "supports")) return;
    const int64_t nq = queries.dim_size(0), ns = supports.dim_size(0);
    OP_REQUIRES(ctx, ns < (int64_t{1} << 31) - 1,
                errors::InvalidArgument("supports has too many points for int32 indices: ", ns));
    std::vector<int64_t> q_starts, s_starts;
    if (!CheckLengths(ctx, ctx->input(2), nq, "q_lengths", "queries", &q_starts)) return;
    if (!CheckLengths(ctx, ctx->input(3), ns, "s_lengths", "supports", &s_starts)) return;
    const int64_t num_clouds = static_cast<int64_t>(q_starts.size()) - 1;
    OP_REQUIRES(ctx, num_clouds == static_cast<int64_t>(s_starts.size()) - 1,
                errors::InvalidArgument("q_lengths has ", num_clouds, " clouds but s_lengths has ",
                                        s_starts.size() - 1));
    double radius;
    if (!CheckPositiveScalar(ctx, ctx->input(4), "radius", &radius)) return;
    const Tensor& max_t = ctx->input(5);
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(max_t.shape()),
                errors::InvalidArgument("max_neighbors must be a scalar"));
    const int64_t max_neighbors = max_t.scalar<int32_t>()();
    OP_REQUIRES(ctx, max_neighbors >= 0,
                errors::InvalidArgument("max_neighbors must be >= 0, got ", max_neighbors));

    const float* q = queries.flat<float>().data();
    const float* s = supports.flat<float>().data();
    const double r2 = radius * radius;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;

    // 1. One grid per cloud; the supports indexed by cell and the queries sorted by cell (clouds
    // in parallel). Queries that are the supports themselves (convolutions) reuse the index order.
    const bool same_points = q == s && q_starts == s_starts;
    std::vector<CellIndex> index(num_clouds);
    std::vector<std::vector<int32_t>> q_order(num_clouds);
    std::vector<std::vector<int64_t>> q_key(num_clouds);
    workers->ParallelFor(num_clouds, 20000 * (ns / (num_clouds + 1) + 1), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Grid grid = SearchGrid(s + 3 * s_starts[b], s_starts[b + 1] - s_starts[b], radius);
        BuildIndex(s, s_starts[b], s_starts[b + 1] - s_starts[b], grid,
                   static_cast<int64_t>(std::ceil(radius / grid.cell - 1e-9)), &index[b]);
        const int64_t n = q_starts[b + 1] - q_starts[b];
        if (same_points) {
          q_order[b] = index[b].ids;
          q_key[b] = index[b].cell_of;
          continue;
        }
        std::vector<int64_t> key;
        std::vector<int32_t> order;
        SortByCell(q + 3 * q_starts[b], n, grid, index[b].use_dense, &key, &order);
        q_order[b].resize(n);
        q_key[b].resize(n);
        for (int64_t i = 0; i < n; ++i) {
          q_order[b][i] = static_cast<int32_t>(q_starts[b] + order[i]);
          q_key[b][i] = key[order[i]];
        }
      }
    });

    // 2. Neighbours of every query, in work units of consecutive sorted queries of one cloud.
    struct Unit {
      int64_t cloud, begin, end;
    };
    std::vector<Unit> units;
    for (int64_t b = 0; b < num_clouds; ++b) {
      if (index[b].ids.empty()) continue;  // queries of a cloud without supports keep no neighbours
      const int64_t n = q_starts[b + 1] - q_starts[b];
      for (int64_t u = 0; u < n; u += kUnitQueries) units.push_back({b, u, std::min(n, u + kUnitQueries)});
    }
    Placement placed;
    placed.count.assign(nq, 0);
    placed.unit.assign(nq, 0);
    placed.offset.assign(nq, 0);
    std::vector<std::vector<int32_t>> results(units.size());
    workers->ParallelFor(static_cast<int64_t>(units.size()), kUnitQueries * 5000, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t u = begin; u < end; ++u) {
        const Unit& unit = units[u];
        SearchUnit(q, index[unit.cloud], q_order[unit.cloud].data(), q_key[unit.cloud].data(), unit.begin,
                   unit.end, r2, max_neighbors, static_cast<int32_t>(u), &scratch, &results[u], &placed);
      }
    });

    int64_t width = 0;
    for (int64_t i = 0; i < nq; ++i) width = std::max<int64_t>(width, placed.count[i]);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({nq, width}), &output));
    int32_t* o = output->flat<int32_t>().data();
    const int32_t shadow = static_cast<int32_t>(ns);
    workers->ParallelFor(nq, width * 2 + 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int32_t* row = o + i * width;
        const int32_t count = placed.count[i];
        if (count) {
          const int32_t* src = results[placed.unit[i]].data() + placed.offset[i];
          std::copy(src, src + count, row);
        }
        std::fill(row + count, row + width, shadow);
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvBatchNeighbors").Device(DEVICE_CPU), BatchNeighborsOp);

}  // namespace
}  // namespace kpconv_tf
