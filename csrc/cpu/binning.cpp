// scGPT per-cell value binning on a CSR matrix (biogen/sc/binning.py documents the semantics).
// One OpenMP task per block of cells; each cell: copy its non-zeros, sort, take numpy's "linear"
// quantiles at the given levels as edges, then per value left = #edges <= x, right = #edges < x and
// bin = ceil(u * (right - left) + left) with u from a counter-based hash of (seed, cell, position).
// Every float step mirrors numpy's order of operations; `volatile` products stop the compiler from
// contracting a*b+c into an FMA (different rounding), so results equal the numpy path bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// #edges <= x (np.digitize right=False), branch-free: the comparisons are data-dependent coin flips
// for a branch predictor, and ~50 edges means ~6 halvings per value.
inline int64_t count_le(const double* e, int64_t n, double x) {
  const double* base = e;
  while (n > 1) {
    const int64_t half = n / 2;
    base = (base[half] <= x) ? base + half : base;
    n -= half;
  }
  return (base - e) + (*base <= x);
}

inline int64_t count_lt(const double* e, int64_t n, double x) {
  const double* base = e;
  while (n > 1) {
    const int64_t half = n / 2;
    base = (base[half] < x) ? base + half : base;
    n -= half;
  }
  return (base - e) + (*base < x);
}

template <typename T>
void bin_rows(const int64_t* indptr, const T* data, int64_t row_begin, int64_t row_end, const double* q,
              int64_t n_edges, uint64_t seed, int64_t cell_offset, int32_t* out, std::vector<double>& vals,
              std::vector<double>& sorted, std::vector<double>& edges) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t lo = indptr[r], hi = indptr[r + 1];
    vals.clear();
    for (int64_t k = lo; k < hi; ++k) {
      const double x = static_cast<double>(data[k]);
      if (x != 0.0) vals.push_back(x);
    }
    const int64_t n = static_cast<int64_t>(vals.size());
    if (n == 0) {
      for (int64_t k = lo; k < hi; ++k) out[k] = 0;
      continue;
    }
    sorted.assign(vals.begin(), vals.end());
    std::sort(sorted.begin(), sorted.end());
    const double last = static_cast<double>(n - 1);
    for (int64_t e = 0; e < n_edges; ++e) {
      const double vi = last * q[e];  // numpy "linear": virtual index (n - 1) * q
      int64_t prev, next;
      double gamma;
      if (vi >= last) {
        prev = next = n - 1;
        gamma = vi - std::floor(vi);
      } else if (vi < 0) {
        prev = next = 0;
        gamma = vi - std::floor(vi);
      } else {
        const double f = std::floor(vi);
        prev = static_cast<int64_t>(f);
        next = prev + 1;
        gamma = vi - f;
      }
      edges[e] = np_lerp(sorted[prev], sorted[next], gamma);
    }
    const uint64_t cell_key = mix64(seed + 0x9E3779B97F4A7C15ULL * (static_cast<uint64_t>(r + cell_offset) + 1));
    const double* eb = edges.data();
    int64_t j = 0;  // position among the cell's non-zeros
    for (int64_t k = lo; k < hi; ++k) {
      const double x = static_cast<double>(data[k]);
      if (x == 0.0) {
        out[k] = 0;
        continue;
      }
      const int64_t left = count_le(eb, n_edges, x);  // np.digitize(right=False)
      int64_t bin = left;
      // right (= np.digitize(right=True)) differs from left only when x equals an edge
      if (left > 0 && eb[left - 1] == x) {
        const int64_t right = count_lt(eb, n_edges, x);
        const double u = tie_uniform(cell_key, static_cast<uint64_t>(j));
        volatile double p = u * static_cast<double>(right - left);
        const double d = p + static_cast<double>(left);
        bin = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(d)));
      }
      out[k] = static_cast<int32_t>(bin);
      ++j;
    }
  }
}

}  // namespace

// indptr: (n_rows + 1) int64; data: nnz float32 (is_f64 == 0) or float64; q: n_edges float64 quantile
// levels; out: nnz int32 bins. Rows must have sorted column indices (the uniforms follow column order).
void bin_csr(const int64_t* indptr, const void* data, int is_f64, int64_t n_rows, const double* q,
             int64_t n_edges, uint64_t seed, int64_t cell_offset, int32_t* out, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  // Blocks of cells rather than single cells: per-cell work is ~1-10 us, so dynamic scheduling per cell
  // would cost as much as the work.
  const int64_t block = 256;
  const int64_t n_blocks = (n_rows + block - 1) / block;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<double> vals, sorted, edges(static_cast<size_t>(n_edges));
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * block, r1 = std::min(n_rows, r0 + block);
      if (is_f64)
        bin_rows(indptr, static_cast<const double*>(data), r0, r1, q, n_edges, seed, cell_offset, out, vals, sorted,
                 edges);
      else
        bin_rows(indptr, static_cast<const float*>(data), r0, r1, q, n_edges, seed, cell_offset, out, vals, sorted,
                 edges);
    }
  }
}

}  // namespace BIOGEN_CPU_NS
