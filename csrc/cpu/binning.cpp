// scGPT per-cell value binning on a CSR matrix (biogen/sc/binning.py documents the semantics).
// One OpenMP task per block of cells; each cell: sort its non-zeros (keeping their positions), take
// numpy's "linear" quantiles at the given levels as edges, then per value left = #edges <= x,
// right = #edges < x and bin = ceil(u * (right - left) + left) with u from a counter-based hash of
// (seed, cell, position among the cell's non-zeros).
// Every float step mirrors numpy's order of operations; `volatile` products stop the compiler from
// contracting a*b+c into an FMA (different rounding), so results equal the numpy path bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "biogen/parallel.h"

namespace BIOGEN_CPU_NS {

namespace {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline double tie_uniform(uint64_t cell_key, uint64_t pos) {
  const uint64_t z = mix64(cell_key ^ (0xD1B54A32D192ED03ULL * (pos + 1)));
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// numpy _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) when t >= 0.5
inline double np_lerp(double a, double b, double t) {
  const double diff = b - a;
  if (t >= 0.5) {
    volatile double p = diff * (1.0 - t);
    return b - p;
  }
  volatile double p = diff * t;
  return a + p;
}

struct Scratch {
  std::vector<uint64_t> keys;   // float32 path: (value bits << 32) | position
  std::vector<std::pair<double, uint32_t>> pairs;  // float64 path
  std::vector<double> sorted;
  std::vector<uint32_t> order;  // position (among the cell's non-zeros) of each sorted value
  std::vector<int64_t> nz_index;  // CSR index of each non-zero
  std::vector<double> edges;
};

// Sort the cell's non-zeros, remembering where each came from. float32: positive float bit patterns
// order like the values, so one uint64 integer sort carries value and position together.
inline void sort_cell(const float* data, int64_t lo, int64_t hi, Scratch& s) {
  s.keys.clear();
  s.nz_index.clear();
  uint32_t j = 0;
  for (int64_t k = lo; k < hi; ++k) {
    const float x = data[k];
    if (x != 0.0f) {
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      s.keys.push_back((static_cast<uint64_t>(bits) << 32) | j++);
      s.nz_index.push_back(k);
    }
  }
  std::sort(s.keys.begin(), s.keys.end());
  const size_t n = s.keys.size();
  s.sorted.resize(n);
  s.order.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(s.keys[i] >> 32);
    float x;
    std::memcpy(&x, &bits, sizeof x);
    s.sorted[i] = static_cast<double>(x);
    s.order[i] = static_cast<uint32_t>(s.keys[i] & 0xffffffffu);
  }
}

inline void sort_cell(const double* data, int64_t lo, int64_t hi, Scratch& s) {
  s.pairs.clear();
  s.nz_index.clear();
  uint32_t j = 0;
  for (int64_t k = lo; k < hi; ++k) {
    const double x = data[k];
    if (x != 0.0) {
      s.pairs.emplace_back(x, j++);
      s.nz_index.push_back(k);
    }
  }
  std::sort(s.pairs.begin(), s.pairs.end());
  const size_t n = s.pairs.size();
  s.sorted.resize(n);
  s.order.resize(n);
  for (size_t i = 0; i < n; ++i) {
    s.sorted[i] = s.pairs[i].first;
    s.order[i] = s.pairs[i].second;
  }
}

template <typename T>
void bin_rows(const int64_t* indptr, const T* data, int64_t row_begin, int64_t row_end, const double* q,
              int64_t n_edges, uint64_t seed, int64_t cell_offset, int32_t* out, Scratch& s) {
  s.edges.resize(static_cast<size_t>(n_edges));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t lo = indptr[r], hi = indptr[r + 1];
    for (int64_t k = lo; k < hi; ++k) out[k] = 0;  // zeros (stored explicitly) stay bin 0
    sort_cell(data, lo, hi, s);
    const int64_t n = static_cast<int64_t>(s.sorted.size());
    if (n == 0) continue;
    const double* sorted = s.sorted.data();
    double* edges = s.edges.data();
    const double last = static_cast<double>(n - 1);
    for (int64_t e = 0; e < n_edges; ++e) {
      const double vi = last * q[e];  // numpy "linear": virtual index (n - 1) * q
      int64_t prev, next;
      double gamma;
      if (vi >= last) {
        prev = next = n - 1;
        gamma = 0.0;  // a == b: the weight does not matter
      } else if (vi < 0) {
        prev = next = 0;
        gamma = 0.0;
      } else {
        const double f = std::floor(vi);
        prev = static_cast<int64_t>(f);
        next = prev + 1;
        gamma = vi - f;
      }
      edges[e] = np_lerp(sorted[prev], sorted[next], gamma);
    }
    const uint64_t cell_key = mix64(seed + 0x9E3779B97F4A7C15ULL * (static_cast<uint64_t>(r + cell_offset) + 1));
    // Values ascend, so #edges <= x (np.digitize right=False) and #edges < x (right=True) only move
    // forward: one merge pass instead of two binary searches per value.
    int64_t left = 0, right = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double x = sorted[i];
      while (left < n_edges && edges[left] <= x) ++left;
      while (right < n_edges && edges[right] < x) ++right;
      int64_t bin = left;
      if (right != left) {
        const double u = tie_uniform(cell_key, s.order[i]);
        volatile double p = u * static_cast<double>(right - left);
        const double d = p + static_cast<double>(left);
        bin = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(d)));
      }
      out[s.nz_index[s.order[i]]] = static_cast<int32_t>(bin);
    }
  }
}

}  // namespace

// indptr: (n_rows + 1) int64; data: nnz float32 (is_f64 == 0) or float64; q: n_edges float64 quantile
// levels; out: nnz int32 bins. Rows must have sorted column indices (the uniforms follow column order).
void bin_csr(const int64_t* indptr, const void* data, int is_f64, int64_t n_rows, const double* q,
             int64_t n_edges, uint64_t seed, int64_t cell_offset, int32_t* out, int num_threads) {
  // a cell's non-zeros are sorted: several element-steps each
  num_threads = biogen::threads_for(num_threads, 4.0 * (indptr[n_rows] - indptr[0]), biogen::kGrainElements);
  // Blocks of cells rather than single cells: per-cell work is ~1-10 us, so dynamic scheduling per cell
  // would cost as much as the work.
  const int64_t block = 256;
  const int64_t n_blocks = (n_rows + block - 1) / block;
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * block, r1 = std::min(n_rows, r0 + block);
      if (is_f64)
        bin_rows(indptr, static_cast<const double*>(data), r0, r1, q, n_edges, seed, cell_offset, out, scratch);
      else
        bin_rows(indptr, static_cast<const float*>(data), r0, r1, q, n_edges, seed, cell_offset, out, scratch);
    }
  }
}

}  // namespace BIOGEN_CPU_NS
