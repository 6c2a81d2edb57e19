// KpconvBatchNeighbors: radius neighbours of stacked clouds, rows sorted by distance.
//
// Search structure: per cloud, the supports are bucketed on a grid of cell size = radius (cells
// sorted by key with a counting sort, supports stored contiguously per cell), so a query scans
// 3 x 3 runs of 3 cells. Queries are processed grouped by their cell: the group's candidates are
// gathered once into contiguous arrays, then each query computes its distances 4 at a time,
// compacts its hits (key, index, distance) without branches and sorts them by ranking 32-bit
// keys; only rows whose keys collide above the hit-number bits are reordered exactly.
// Grid rather than KD-tree, by measurement on W1 layer 0 (111,480 queries in their own clouds,
// r = 0.05, 2 cores, medians of benchmarks/bench_ops.py in one run): this grid ~12 ms, scipy
// cKDTree (workers=-1) ~148 ms for k nearest within r and ~409 ms for query_ball_point. Surface
// clouds subsampled at ~r/2.5 put a bounded number of points in each cell, so the 27-cell scan has
// few wasted candidates and no tree descent. When the grid would be much larger than the cloud
// (tiny radius), cell lookups fall back to a binary search over the occupied cells, so memory
// stays O(N) for any radius.
//
// Distances: squared distances are computed in double from the float32 coordinates and compared
// with radius^2 in double (distance <= radius), so a float64 brute force reproduces them exactly.
// Ties are broken by support index. The build passes -ffp-contract=off so that no FMA fusion
// changes the rounding of d2.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define KPCONV_X86 1
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
// The id and coordinate arrays carry kPad zero entries past `size` so that the candidate gather
// can copy whole 4-element blocks.
constexpr int64_t kPad = 4;
struct CellIndex {
  Grid grid;
  int64_t size = 0;                 // number of supports
  std::vector<int32_t> ids;         // stacked support indices sorted by cell key
  std::vector<double> x, y, z;      // their coordinates (exact float -> double), in that order
  std::vector<int64_t> cell_of;     // cell key of each sorted support
  std::vector<int64_t> keys;        // without cell_start: occupied cell keys, ascending,
  std::vector<int64_t> starts;      // and the run start of each in `ids` (+ end)
  std::vector<int32_t> cell_start;  // when affordable: start in `ids` of every cell key (+ end)
  bool use_dense = false;
  int64_t reach = 1;  // cells to scan on each side of the query's cell

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
void SortByCell(const float* pts, int64_t n, const Grid& grid, bool dense,
                std::vector<int64_t>* key, std::vector<int32_t>* order,
                std::vector<int32_t>* cell_start = nullptr) {
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
  index->size = n;
  const int64_t total_cells = grid.dims[0] * grid.dims[1] * grid.dims[2];
  index->use_dense = total_cells <= 16 * n + 4096;  // the dense table costs O(cells) per call
  std::vector<int64_t> key;
  std::vector<int32_t> order;
  SortByCell(pts + 3 * first, n, grid, index->use_dense, &key, &order, &index->cell_start);
  index->ids.assign(n + kPad, 0);
  index->x.assign(n + kPad, 0.0);
  index->y.assign(n + kPad, 0.0);
  index->z.assign(n + kPad, 0.0);
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

// Sort key of the hit number h at squared distance d2: the float bits of d2 (monotone in d2)
// with their low 7 mantissa bits replaced by h & 0x7F. Unique within a row of <= 128 hits and in
// distance order up to the dropped bits; rows whose keys agree on the rest are reordered exactly.
inline int32_t HitKey(double d2, int64_t h) {
  const float f = static_cast<float>(d2);
  int32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return (bits & ~0x7F) | static_cast<int32_t>(h & 0x7F);
}

// For one query p and n gathered candidates: the hits (squared distance <= r2), compacted in
// candidate order, as sort keys (HitKey), support indices and squared distances; returns their
// number. Outputs need 4 slots of slack. The distance test is
// unpredictable, hence the branch-free compaction.
int64_t HitsScalar(const double* xs, const double* ys, const double* zs, const int32_t* cids,
                   int64_t n, double px, double py, double pz, double r2, int32_t* keys,
                   int32_t* ids, double* d2) {
  int64_t m = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double dx = xs[c] - px, dy = ys[c] - py, dz = zs[c] - pz;
    const double d = dx * dx + dy * dy + dz * dz;
    keys[m] = HitKey(d, m);
    ids[m] = cids[c];
    d2[m] = d;
    m += d <= r2;
  }
  return m;
}

// Whether two consecutive sorted keys agree above the hit-number bits (a run that needs the
// exact order).
bool HasTies(const int32_t* ranked, int64_t m) {
  for (int64_t h = 0; h + 1 < m; ++h)
    if (((ranked[h] ^ ranked[h + 1]) >> 7) == 0) return true;
  return false;
}

// Sorts the m unique keys (m <= 128) by counting each one's rank, writing them in order to
// `ranked`; returns HasTies of the result. `keys` is padded with INT32_MAX to a multiple of 8.
bool RankSortScalar(const int32_t* __restrict keys, int64_t m, int32_t* __restrict ranked) {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t ki = keys[i];
    int32_t rank = 0;
    for (int64_t j = 0; j < m; ++j) rank += keys[j] < ki;
    ranked[rank] = ki;
  }
  return HasTies(ranked, m);
}

#ifdef KPCONV_X86
// Lane positions of the set bits of a 4-bit mask, packed first (compaction without AVX-512), as
// 32-bit lane indices and as pairs of 32-bit halves for the permutation of doubles.
struct CompressTable {
  alignas(16) int32_t lanes[16][4];
  alignas(32) int32_t halves[16][8];
  CompressTable() {
    for (int mask = 0; mask < 16; ++mask) {
      int k = 0;
      for (int b = 0; b < 4; ++b)
        if (mask & (1 << b)) lanes[mask][k++] = b;
      while (k < 4) lanes[mask][k++] = 0;
      for (int l = 0; l < 4; ++l) {
        halves[mask][2 * l] = 2 * lanes[mask][l];
        halves[mask][2 * l + 1] = 2 * lanes[mask][l] + 1;
      }
    }
  }
};
const CompressTable kCompress;

// HitsScalar, 4 candidates per step (same operations in the same order, so the same d2 bits).
// The last step masks the lanes past n: the candidate arrays must be readable up to n rounded
// up to a multiple of 4.
__attribute__((target("avx2,popcnt"))) int64_t HitsAvx2(const double* xs, const double* ys,
                                                        const double* zs, const int32_t* cids,
                                                        int64_t n, double px, double py, double pz,
                                                        double r2, int32_t* keys, int32_t* ids,
                                                        double* d2) {
  const __m256d vx = _mm256_set1_pd(px), vy = _mm256_set1_pd(py), vz = _mm256_set1_pd(pz);
  const __m256d vr2 = _mm256_set1_pd(r2);
  const __m128i high = _mm_set1_epi32(~0x7F), low = _mm_set1_epi32(0x7F);
  const __m128i step = _mm_setr_epi32(0, 1, 2, 3);
  int64_t m = 0;
  for (int64_t c = 0; c < n; c += 4) {
    const __m256d dx = _mm256_sub_pd(_mm256_loadu_pd(xs + c), vx);
    const __m256d dy = _mm256_sub_pd(_mm256_loadu_pd(ys + c), vy);
    const __m256d dz = _mm256_sub_pd(_mm256_loadu_pd(zs + c), vz);
    const __m256d d = _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(dx, dx), _mm256_mul_pd(dy, dy)),
                                    _mm256_mul_pd(dz, dz));
    int mask = _mm256_movemask_pd(_mm256_cmp_pd(d, vr2, _CMP_LE_OQ));
    if (n - c < 4) mask &= (1 << (n - c)) - 1;
    const __m128i lanes = _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress.lanes[mask]));
    const __m128i hit_numbers =
        _mm_and_si128(_mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(m)), step), low);
    const __m128i bits = _mm_castps_si128(_mm_permutevar_ps(_mm256_cvtpd_ps(d), lanes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + m),
                     _mm_or_si128(_mm_and_si128(bits, high), hit_numbers));
    const __m128i cand = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cids + c));
    _mm_storeu_ps(reinterpret_cast<float*>(ids + m),
                  _mm_permutevar_ps(_mm_castsi128_ps(cand), lanes));
    const __m256i halves =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.halves[mask]));
    _mm256_storeu_pd(d2 + m,
                     _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(d), halves)));
    m += __builtin_popcount(mask);
  }
  return m;
}

// RankSortScalar with 8 keys ranked per step against every key in turn (two chains of
// accumulators), and the tie test 8 pairs at a time. `ranked` needs 9 slots of slack.
__attribute__((target("avx2,popcnt"))) bool RankSortAvx2(const int32_t* __restrict keys, int64_t m,
                                                         int32_t* __restrict ranked) {
  const int64_t even = (m + 1) & ~int64_t{1};  // keys[m] is INT32_MAX when m is odd
  for (int64_t i = 0; i < m; i += 8) {
    const __m256i ki = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    __m256i r0 = _mm256_setzero_si256(), r1 = _mm256_setzero_si256();
    for (int64_t j = 0; j < even; j += 2) {
      r0 = _mm256_sub_epi32(r0, _mm256_cmpgt_epi32(ki, _mm256_set1_epi32(keys[j])));
      r1 = _mm256_sub_epi32(r1, _mm256_cmpgt_epi32(ki, _mm256_set1_epi32(keys[j + 1])));
    }
    alignas(32) int32_t rank[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(rank), _mm256_add_epi32(r0, r1));
    const int64_t lanes = std::min<int64_t>(8, m - i);
    for (int64_t l = 0; l < lanes; ++l) ranked[rank[l]] = keys[i + l];
  }
  for (int64_t h = 0; h + 1 < m; h += 8) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranked + h));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ranked + h + 1));
    const __m256i same =
        _mm256_cmpeq_epi32(_mm256_srli_epi32(_mm256_xor_si256(a, b), 7), _mm256_setzero_si256());
    int pairs = _mm256_movemask_ps(_mm256_castsi256_ps(same));
    if (m - 1 - h < 8) pairs &= (1 << (m - 1 - h)) - 1;  // only pairs (h, h + 1) with h + 1 < m
    if (pairs) return true;
  }
  return false;
}

#endif  // KPCONV_X86

// The per-row kernels: AVX2 unless the CPU lacks it or KPCONV_TF_NO_SIMD is set (tests use it to
// check that the portable path gives identical rows).
struct RowKernels {
  int64_t (*hits)(const double*, const double*, const double*, const int32_t*, int64_t, double,
                  double, double, double, int32_t*, int32_t*, double*);
  bool (*rank_sort)(const int32_t*, int64_t, int32_t*);
};

RowKernels ChooseKernels() {
#ifdef KPCONV_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
      std::getenv("KPCONV_TF_NO_SIMD") == nullptr)
    return {HitsAvx2, RankSortAvx2};
#endif
  return {HitsScalar, RankSortScalar};
}

// Per-thread buffers of the search.
struct Scratch {
  std::vector<double> cx, cy, cz;  // candidates of the current cell group
  std::vector<int32_t> cid;        // and their support indices
  std::vector<int32_t> keys, ids;  // one query's hits: sort keys and support indices,
  std::vector<double> d2;          // squared distances,
  std::vector<int32_t> ranked;     // keys in sorted order,
  std::vector<int32_t> hit_order;  // hit numbers in exact order (rows with ties)
  std::vector<int64_t> wide;       // keys of rows too long for 32-bit keys
  std::vector<std::pair<int64_t, int64_t>> runs;  // candidate runs [begin, end) of the group
  void Reserve(int64_t n) {
    if (static_cast<int64_t>(cx.size()) >= n + 16) return;
    const int64_t size = 2 * n + 16;  // slack for the 4-wide gather and hit stores, key padding
    for (auto* v : {&cx, &cy, &cz, &d2}) v->resize(size);
    for (auto* v : {&cid, &keys, &ids, &ranked, &hit_order}) v->resize(size);
  }
};

// Sorted, cropped rows of the queries of one work unit, stored back to back.
struct UnitRows {
  std::vector<int32_t> counts;  // kept neighbours per query, in the unit's query order
  std::unique_ptr<int32_t[]> ids;
  int64_t size = 0, capacity = 0;
  int64_t widest = 0;
  // Room for m more ids at ids[size]; no zero-filling, as every slot is written before it is read.
  int32_t* Extend(int64_t m) {
    if (size + m > capacity) {
      const int64_t grown = std::max(2 * capacity, size + m + 1024);
      std::unique_ptr<int32_t[]> bigger(new int32_t[grown]);
      if (size) std::memcpy(bigger.get(), ids.get(), size * sizeof(int32_t));
      ids = std::move(bigger);
      capacity = grown;
    }
    int32_t* at = ids.get() + size;
    size += m;
    return at;
  }
};

// Writes the first `keep` neighbours of a row of m hits in exact order: by distance, then support
// index. `ties` says whether the ranked keys have runs that agree above the hit-number bits.
void WriteRow(Scratch* sc, int64_t m, bool ties, int64_t keep, int32_t* row) {
  const int32_t* ids = sc->ids.data();
  const double* d2 = sc->d2.data();
  const auto exact_less = [&](int32_t u, int32_t v) {
    return d2[u] < d2[v] || (d2[u] == d2[v] && ids[u] < ids[v]);
  };
  int32_t* order = sc->hit_order.data();
  // Orders exactly the runs of sorted positions whose keys agree (same(f, h)) that start before
  // `keep`.
  const auto order_runs = [&](auto same) {
    for (int64_t h = 0; h < keep;) {
      int64_t f = h + 1;
      while (f < m && same(f, h)) ++f;
      if (f - h > 1) std::sort(order + h, order + f, exact_less);
      h = f;
    }
  };
  if (m <= kRankSortMax) {
    const int32_t* ranked = sc->ranked.data();
    if (!ties) {
      for (int64_t h = 0; h < keep; ++h) row[h] = ids[ranked[h] & 0x7F];
      return;
    }
    for (int64_t h = 0; h < m; ++h) order[h] = ranked[h] & 0x7F;
    order_runs([&](int64_t f, int64_t h) { return ((ranked[f] ^ ranked[h]) >> 7) == 0; });
  } else {  // 64-bit keys: (float bits of d2, hit number)
    std::vector<int64_t>& wide = sc->wide;
    wide.resize(m);
    for (int64_t h = 0; h < m; ++h) wide[h] = (static_cast<int64_t>(HitKey(d2[h], 0)) << 32) | h;
    std::sort(wide.begin(), wide.end());
    for (int64_t h = 0; h < m; ++h) order[h] = static_cast<int32_t>(wide[h]);
    order_runs([&](int64_t f, int64_t h) { return (wide[f] >> 32) == (wide[h] >> 32); });
  }
  for (int64_t h = 0; h < keep; ++h) row[h] = ids[order[h]];
}

// Searches the queries order[begin, end) of one cloud (sorted by their cell `qkey`), appending
// their rows to `out`.
void SearchUnit(const float* q, const CellIndex& idx, const int32_t* order, const int64_t* qkey,
                int64_t begin, int64_t end, double r2, int64_t max_neighbors, Scratch* sc,
                UnitRows* out) {
  static const RowKernels kernels = ChooseKernels();
  const Grid& g = idx.grid;
  const int64_t reach = idx.reach;
  out->counts.resize(end - begin);
  for (int64_t a = begin; a < end;) {
    int64_t e = a + 1;
    while (e < end && qkey[e] == qkey[a]) ++e;
    // The group's cell, from its first query (all share the key).
    const float* p0 = q + 3 * order[a];
    const int64_t ci = g.Coord(p0[0], 0), cj = g.Coord(p0[1], 1), ck = g.Coord(p0[2], 2);
    const int64_t i0 = std::max<int64_t>(ci - reach, 0), i1 = std::min(ci + reach, g.dims[0] - 1);
    sc->runs.clear();
    int64_t nc = 0;
    for (int64_t k = std::max<int64_t>(ck - reach, 0); k <= std::min(ck + reach, g.dims[2] - 1);
         ++k) {
      for (int64_t j = std::max<int64_t>(cj - reach, 0); j <= std::min(cj + reach, g.dims[1] - 1);
           ++j) {
        int64_t b0, b1;
        idx.Range(g.Key(i0, j, k), g.Key(i1, j, k), &b0, &b1);
        if (b1 > b0) sc->runs.emplace_back(b0, b1);
        nc += b1 - b0;
      }
    }
    sc->Reserve(nc);
    // Whole 4-element blocks: a run may copy up to 3 entries past its end (the index is padded),
    // which the next run overwrites or the masked last step of the hit search ignores.
    int64_t c = 0;
    for (const auto& run : sc->runs) {
      for (int64_t t = run.first; t < run.second; t += 4, c += 4) {
        std::memcpy(&sc->cx[c], &idx.x[t], 4 * sizeof(double));
        std::memcpy(&sc->cy[c], &idx.y[t], 4 * sizeof(double));
        std::memcpy(&sc->cz[c], &idx.z[t], 4 * sizeof(double));
        std::memcpy(&sc->cid[c], &idx.ids[t], 4 * sizeof(int32_t));
      }
      c -= (4 - (run.second - run.first) % 4) % 4;
    }
    for (int64_t t = a; t < e; ++t) {
      const float* p = q + 3 * order[t];
      const int64_t m =
          kernels.hits(sc->cx.data(), sc->cy.data(), sc->cz.data(), sc->cid.data(), nc, p[0], p[1],
                       p[2], r2, sc->keys.data(), sc->ids.data(), sc->d2.data());
      bool ties = true;
      if (m <= kRankSortMax) {
        std::fill(sc->keys.data() + m, sc->keys.data() + ((m + 7) & ~int64_t{7}), INT32_MAX);
        ties = kernels.rank_sort(sc->keys.data(), m, sc->ranked.data());
      }
      const int64_t keep = max_neighbors > 0 ? std::min<int64_t>(m, max_neighbors) : m;
      out->counts[t - begin] = static_cast<int32_t>(keep);
      out->widest = std::max(out->widest, keep);
      WriteRow(sc, m, ties, keep, out->Extend(keep));
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
      // A cell below the coordinates' precision can round the origin past every point: one cell
      // (Coord clamps into it).
      const double span = std::max(1.0, std::floor((hi[a] - g.origin[a]) / cell) + 1.0);
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
    workers->ParallelFor(
        num_clouds, 20000 * (ns / (num_clouds + 1) + 1), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const Grid grid =
                SearchGrid(s + 3 * s_starts[b], s_starts[b + 1] - s_starts[b], radius);
            BuildIndex(s, s_starts[b], s_starts[b + 1] - s_starts[b], grid,
                       static_cast<int64_t>(std::ceil(radius / grid.cell - 1e-9)), &index[b]);
            const int64_t n = q_starts[b + 1] - q_starts[b];
            if (same_points) {
              q_order[b].assign(index[b].ids.begin(), index[b].ids.begin() + n);
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
      if (index[b].size == 0) continue;  // queries of a cloud without supports keep no neighbours
      const int64_t n = q_starts[b + 1] - q_starts[b];
      for (int64_t u = 0; u < n; u += kUnitQueries)
        units.push_back({b, u, std::min(n, u + kUnitQueries)});
    }
    std::vector<UnitRows> rows(units.size());
    workers->ParallelFor(
        static_cast<int64_t>(units.size()), kUnitQueries * 5000, [&](int64_t begin, int64_t end) {
          Scratch scratch;
          for (int64_t u = begin; u < end; ++u) {
            const Unit& unit = units[u];
            SearchUnit(q, index[unit.cloud], q_order[unit.cloud].data(), q_key[unit.cloud].data(),
                       unit.begin, unit.end, r2, max_neighbors, &scratch, &rows[u]);
          }
        });

    // 3. The padded matrix: each unit copies its rows to their queries' places.
    int64_t width = 0;
    for (const UnitRows& r : rows) width = std::max(width, r.widest);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({nq, width}), &output));
    int32_t* o = output->flat<int32_t>().data();
    const int32_t shadow = static_cast<int32_t>(ns);
    workers->ParallelFor(static_cast<int64_t>(units.size()), kUnitQueries * (width + 8),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t u = begin; u < end; ++u) {
                             const int32_t* order = q_order[units[u].cloud].data();
                             const int32_t* src = rows[u].ids.get();
                             for (int64_t t = units[u].begin; t < units[u].end; ++t) {
                               int32_t* row = o + static_cast<int64_t>(order[t]) * width;
                               const int32_t count = rows[u].counts[t - units[u].begin];
                               std::copy(src, src + count, row);
                               std::fill(row + count, row + width, shadow);
                               src += count;
                             }
                           }
                         });
    for (int64_t b = 0; b < num_clouds; ++b) {
      if (index[b].size == 0)
        std::fill(o + q_starts[b] * width, o + q_starts[b + 1] * width, shadow);
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvBatchNeighbors").Device(DEVICE_CPU), BatchNeighborsOp);

}  // namespace
}  // namespace kpconv_tf
