// Performer FAVOR+ linear attention (SPEC 1.2), forward and backward, CPU: OpenMP + v16f.
//
// phi(x) = ratio * (E(x) + eps) with, for the softmax kernel, E = exp(s x.W_f - s^2|x|^2/2 - c),
// s = D^-0.25, ratio = m^-0.5, c the (detached) stabiliser; for the relu kernel E = relu(s x.W_f),
// ratio = 1, c = 0. Non-causal: out_i = phi(q_i) C / (phi(q_i) . z) with C = sum_j phi(k_j) v_j^T,
// z = sum_j phi(k_j) over valid keys. Keys are streamed once in tiles of kTile; phi(K) and phi(Q)
// exist only one tile at a time. The exp part of C and z is accumulated apart from the eps part
// (eps * sum_j v_j, eps * count): only the exp part is rescaled by exp(c_old - c_new) when the
// running key max grows, which keeps the result exactly that of the global-max definition.
// Causal: performer-pytorch's causal_linear_attention_noncuda (including its 1e-6 in the
// denominator) computed as chunked prefix sums: kTile positions at a time, a C x C masked score
// block inside the chunk plus an m x D state for the earlier ones (see the causal section).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "biogen/common.h"
#include "biogen/parallel.h"
#include "biogen/cpu_dispatch.h"
#include "biogen/vec.h"

namespace BIOGEN_CPU_NS {
namespace {

using biogen::v16f;
using biogen::vbroadcast;
using biogen::vexp;
using biogen::vload;
using biogen::vmax;
using biogen::vstore;
using biogen::kVec;

constexpr int kTile = 64;  // rows of a feature tile: 64 x 288 floats of phi stays in L1/L2
constexpr float kCausalEps = 1e-6f;

inline int round_up(int x, int to) { return (x + to - 1) / to * to; }

// Y[R x 16*NC] = X[R x K] @ Bm[K x 16*NC] (row-broadcast microkernel; accumulators in registers).
template <int R, int NC>
inline void micro_nn(const float* X, int ldx, int K, const float* Bm, int ldb, float* Y, int ldy) {
  v16f acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = vbroadcast(0.f);
  for (int kk = 0; kk < K; ++kk) {
    v16f b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = vload(Bm + (int64_t)kk * ldb + c * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const v16f x = vbroadcast(X[(int64_t)r * ldx + kk]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] += x * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) vstore(Y + (int64_t)r * ldy + c * kVec, acc[r][c]);
}

// Register tiles of gemm_nn. AVX-512 (32 zmm): 6 x 64 columns, 24 accumulators, 10 loads for 24
// FMAs and enough independent chains to fill both FMA pipes. Narrower ISAs hold a v16f in 2 or 4
// registers (16 in all): 4 x 32 columns, as many as fit without spilling.
#if defined(__AVX512F__)
constexpr int kNNRows = 6, kNNVecs = 4;
#else
constexpr int kNNRows = 4, kNNVecs = 2;
#endif

// Walks a rows x ncols output (ncols a multiple of 16) in register tiles: Micro::run<R, NC>(r, c,
// args...) computes rows [r, r + R) x columns [c, c + 16 NC); RB x 16 NCB is the widest tile.
template <class Micro, int R, int NCB, class... A>
inline void tile_cols(int r, int ncols, const A&... a) {
  int c = 0;
  if constexpr (NCB >= 4)
    for (; c + 64 <= ncols; c += 64) Micro::template run<R, 4>(r, c, a...);
  for (; c + 32 <= ncols; c += 32) Micro::template run<R, 2>(r, c, a...);
  for (; c < ncols; c += 16) Micro::template run<R, 1>(r, c, a...);
}

template <class Micro, int RB, int NCB, class... A>
inline void tile_rows(int rows, int ncols, const A&... a) {
  static_assert(RB <= 6, "row remainders up to 5");
  int r = 0;
  for (; r + RB <= rows; r += RB) tile_cols<Micro, RB, NCB>(r, ncols, a...);
  switch (rows - r) {
    case 5: tile_cols<Micro, 5, NCB>(r, ncols, a...); break;
    case 4: tile_cols<Micro, 4, NCB>(r, ncols, a...); break;
    case 3: tile_cols<Micro, 3, NCB>(r, ncols, a...); break;
    case 2: tile_cols<Micro, 2, NCB>(r, ncols, a...); break;
    case 1: tile_cols<Micro, 1, NCB>(r, ncols, a...); break;
    default: break;
  }
}

struct MicroNN {
  template <int R, int NC>
  static void run(int r, int c, const float* X, int ldx, int K, const float* Bm, int ldb, float* Y, int ldy) {
    micro_nn<R, NC>(X + (int64_t)r * ldx, ldx, K, Bm + c, ldb, Y + (int64_t)r * ldy + c, ldy);
  }
};

// Y = X @ Bm for `rows` rows and `ncols` (a multiple of 16) columns.
void gemm_nn(const float* X, int ldx, int rows, int K, const float* Bm, int ldb, int ncols, float* Y, int ldy) {
  tile_rows<MicroNN, kNNRows, kNNVecs>(rows, ncols, X, ldx, K, Bm, ldb, Y, ldy);
}

// A[F x 16*NV] += X[rows x F-block]^T @ V[rows x 16*NV] for one block of FB feature rows.
template <int FB, int NV>
inline void micro_tn(const float* X, int ldx, int rows, const float* V, int ldv, float* A, int lda) {
  v16f acc[FB][NV];
#pragma GCC unroll 8
  for (int f = 0; f < FB; ++f)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[f][c] = vload(A + (int64_t)f * lda + c * kVec);
  for (int t = 0; t < rows; ++t) {
    v16f vv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vv[c] = vload(V + (int64_t)t * ldv + c * kVec);
#pragma GCC unroll 8
    for (int f = 0; f < FB; ++f) {
      const v16f x = vbroadcast(X[(int64_t)t * ldx + f]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[f][c] += x * vv[c];
    }
  }
#pragma GCC unroll 8
  for (int f = 0; f < FB; ++f)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vstore(A + (int64_t)f * lda + c * kVec, acc[f][c]);
}

template <int NV>
void gemm_tn_acc_nv(const float* X, int ldx, int rows, int F, const float* V, int ldv, float* A, int lda) {
  constexpr int FB = NV <= 2 ? 8 : NV <= 4 ? 4 : 2;
  int f = 0;
  for (; f + FB <= F; f += FB) micro_tn<FB, NV>(X + f, ldx, rows, V, ldv, A + (int64_t)f * lda, lda);
  for (; f < F; ++f) micro_tn<1, NV>(X + f, ldx, rows, V, ldv, A + (int64_t)f * lda, lda);
}

// A[F x 16*nv] += X^T V, X: rows x F (ld ldx), V: rows x 16*nv.
void gemm_tn_acc(const float* X, int ldx, int rows, int F, const float* V, int ldv, int nv, float* A, int lda) {
  switch (nv) {
    case 1: gemm_tn_acc_nv<1>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 2: gemm_tn_acc_nv<2>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 3: gemm_tn_acc_nv<3>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 4: gemm_tn_acc_nv<4>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 5: gemm_tn_acc_nv<5>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 6: gemm_tn_acc_nv<6>(X, ldx, rows, F, V, ldv, A, lda); break;
    case 7: gemm_tn_acc_nv<7>(X, ldx, rows, F, V, ldv, A, lda); break;
    default: gemm_tn_acc_nv<8>(X, ldx, rows, F, V, ldv, A, lda); break;
  }
}

inline float dot(const float* a, const float* b, int n) {  // n a multiple of 16
  v16f acc = vbroadcast(0.f);
  for (int i = 0; i < n; i += kVec) acc += vload(a + i) * vload(b + i);
  return biogen::vsum(acc);
}

// ----------------------------------------------------------------------------- bf16 dot products
// With bfloat16 inputs on a CPU with AVX512-BF16 (CpuCap::avx512_bf16) the non-causal kernel takes
// its products as torch.autocast takes a matmul: operands rounded to bf16 (nearest even), sums in
// float32, here with VDPBF16PS (two products per lane: twice the rate of float32 FMAs). Operands
// are packed in pairs along the contraction index k: word (k/2, n) holds element (k, n) in its low
// and (k + 1, n) in its high 16 bits (zero past the end).
#if defined(__AVX512F__) && defined(__GNUC__)
#define BIOGEN_BF16_DOT 1
#define BIOGEN_TARGET_BF16 __attribute__((target("avx512bf16")))
#else
#define BIOGEN_BF16_DOT 0
#endif

#if BIOGEN_BF16_DOT
typedef uint32_t v16u __attribute__((vector_size(64), aligned(64)));
typedef uint16_t v16h_u __attribute__((vector_size(32), aligned(2)));

inline v16u bf16_bits(v16f x) {  // round to nearest even (finite inputs), in the low 16 bits
  v16u u;
  std::memcpy(&u, &x, sizeof(u));
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// out (ceil(rows/2) x N words) = rows x N of A (ld lda) in pairs of rows; N a multiple of 16.
inline void pack_row_pairs(const float* A, int lda, int rows, int N, uint32_t* out) {
  for (int k = 0; k < rows; k += 2) {
    const float* a0 = A + (int64_t)k * lda;
    uint32_t* o = out + (int64_t)(k / 2) * N;
    for (int n = 0; n < N; n += kVec) {
      v16u w = bf16_bits(vload(a0 + n));
      if (k + 1 < rows) w |= bf16_bits(vload(a0 + lda + n)) << 16;
      std::memcpy(o + n, &w, sizeof(w));
    }
  }
}

// out (rows x K2 words) = columns [0, 2 K2) of X in bf16: pairs along a row are its bf16 layout.
// X must hold 2 K2 columns rounded up to 16 (the kernels' padded tiles, zero past K).
inline void pack_col_pairs(const float* X, int ldx, int rows, int K2, uint32_t* out) {
  for (int r = 0; r < rows; ++r) {
    uint16_t* o = (uint16_t*)(out + (int64_t)r * K2);
    const float* x = X + (int64_t)r * ldx;
    int j = 0;
    for (; j + kVec <= 2 * K2; j += kVec) *(v16h_u*)(o + j) = __builtin_convertvector(bf16_bits(vload(x + j)), v16h_u);
    if (j < 2 * K2) {
      const v16h_u t = __builtin_convertvector(bf16_bits(vload(x + j)), v16h_u);
      for (int i = 0; j + i < 2 * K2; ++i) o[j + i] = t[i];
    }
  }
}

// Y[R x 16 NC] (+)= X @ B with X word (r, k) at X[r xr + k xk] and B packed (K2 x ldb words).
template <int R, int NC>
BIOGEN_TARGET_BF16 inline void micro_dp(const uint32_t* X, int64_t xr, int64_t xk, int K2, const uint32_t* Bp,
                                        int64_t ldb, float* Y, int64_t ldy, bool accumulate) {
  __m512 acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = accumulate ? _mm512_loadu_ps(Y + r * ldy + c * kVec) : _mm512_setzero_ps();
  for (int k = 0; k < K2; ++k) {
    __m512bh b[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) b[c] = (__m512bh)_mm512_loadu_si512(Bp + k * ldb + c * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32((int)X[r * xr + k * xk]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, b[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(Y + r * ldy + c * kVec, acc[r][c]);
}

struct MicroDP {
  template <int R, int NC>
  BIOGEN_TARGET_BF16 static void run(int r, int c, const uint32_t* X, int64_t xr, int64_t xk, int K2,
                                     const uint32_t* Bp, int ldb, float* Y, int ldy, bool accumulate) {
    micro_dp<R, NC>(X + r * xr, xr, xk, K2, Bp + c, ldb, Y + (int64_t)r * ldy + c, ldy, accumulate);
  }
};

// Y (rows x ncols, ncols a multiple of 16) = or += X @ B over K2 word pairs.
void gemm_dp(const uint32_t* X, int64_t xr, int64_t xk, int rows, int K2, const uint32_t* Bp, int ldb, int ncols,
             float* Y, int ldy, bool accumulate) {
  tile_rows<MicroDP, 6, 4>(rows, ncols, X, xr, xk, K2, Bp, ldb, Y, ldy, accumulate);
}
#endif

// Packed pairs of a K x N operand (empty unless the bf16 path is on).
inline std::vector<uint32_t> packed(bool on, const float* A, int lda, int K, int N) {
  std::vector<uint32_t> out;
#if BIOGEN_BF16_DOT
  if (on) {
    out.resize((size_t)(K + 1) / 2 * N);
    pack_row_pairs(A, lda, K, N, out.data());
  }
#endif
  return out;
}

// Everything one call needs; S is the storage type (F32 / F16 / BF16).
template <class S>
struct Problem {
  using T = typename S::T;
  int B, H, L, D, m, Dp, Mp, NV;
  float s, ratio, eps;
  bool relu;
  const uint8_t* pad;
  std::vector<float> Wt;  // D x Mp: s-free projection, transposed, zero columns beyond m
  std::vector<float> Wp;  // Mp x Dp: projection padded with zeros
  bool dot16 = false;              // bf16 products (non-causal, bf16 inputs, AVX512-BF16)
  std::vector<uint32_t> Wtp, Wpp;  // on that path: Wt (D rows) and Wp (m rows) packed in pairs

  void init(const float* W) {
    Dp = round_up(D, kVec);
    Mp = round_up(m, 32);
    NV = Dp / kVec;
    Wt.assign((size_t)D * Mp, 0.f);
    Wp.assign((size_t)Mp * Dp, 0.f);
    for (int f = 0; f < m; ++f)
      for (int d = 0; d < D; ++d) {
        Wt[(size_t)d * Mp + f] = W[(size_t)f * D + d];
        Wp[(size_t)f * Dp + d] = W[(size_t)f * D + d];
      }
    Wtp = packed(dot16, Wt.data(), Mp, D, Mp);
    Wpp = packed(dot16, Wp.data(), Dp, m, Dp);
  }

  // Per (b, h) K x N operands (one after the other, ld N) in packed pairs; empty off the bf16 path.
  std::vector<uint32_t> pack_each(const std::vector<float>& M, int K, int N) const {
    std::vector<uint32_t> out;
#if BIOGEN_BF16_DOT
    if (!dot16) return out;
    const size_t per = (size_t)(K + 1) / 2 * N, stride = (size_t)Mp * Dp;
    out.resize((size_t)B * H * per);
    for (int bh = 0; bh < B * H; ++bh) pack_row_pairs(M.data() + bh * stride, N, K, N, out.data() + bh * per);
#endif
    return out;
  }
  static const uint32_t* at(const std::vector<uint32_t>& v, size_t off) { return v.empty() ? nullptr : v.data() + off; }

  // Y (n x N) = X (n x K, zero past K up to a multiple of 16) @ B (K x N, ld ldb); on the bf16 path
  // B comes as its packed pairs Bp and xp is scratch for n * ceil(K / 2) words.
  void nn(const float* X, int ldx, int n, int K, const float* Bm, int ldb, const uint32_t* Bp, int N, float* Y,
          int ldy, uint32_t* xp) const {
#if BIOGEN_BF16_DOT
    if (dot16) {
      const int K2 = (K + 1) / 2;
      pack_col_pairs(X, ldx, n, K2, xp);
      gemm_dp(xp, K2, 1, n, K2, Bp, N, N, Y, ldy, false);
      return;
    }
#endif
    gemm_nn(X, ldx, n, K, Bm, ldb, N, Y, ldy);
  }

  // A (F x 16 nv) += X^T V over n rows (X rows hold F columns rounded up to 16); xp, vp: scratch.
  void tn(const float* X, int ldx, int n, int F, const float* V, int ldv, int nv, float* A, int lda, uint32_t* xp,
          uint32_t* vp) const {
#if BIOGEN_BF16_DOT
    if (dot16) {
      const int Fp = round_up(F, kVec);
      pack_row_pairs(X, ldx, n, Fp, xp);
      pack_row_pairs(V, ldv, n, nv * kVec, vp);
      gemm_dp(xp, 1, Fp, F, (n + 1) / 2, vp, nv * kVec, nv * kVec, A, lda, true);
      return;
    }
#endif
    gemm_tn_acc(X, ldx, n, F, V, ldv, nv, A, lda);
  }
  bool valid(int b, int l) const { return pad == nullptr || pad[(int64_t)b * L + l] == 0; }

  // Rows idx[0..n) of one (b, h) slice of x into dst (n x Dp, zero beyond D).
  void load(const T* x, int64_t sb, int64_t sh, int64_t sl, int b, int h, const int* idx, int n, float* dst) const {
    const T* base = x + b * sb + h * sh;
    for (int t = 0; t < n; ++t) {
      const T* row = base + idx[t] * sl;
      float* o = dst + (int64_t)t * Dp;
      for (int d = 0; d < D; ++d) o[d] = S::load(row + d);
      for (int d = D; d < Dp; ++d) o[d] = 0.f;
    }
  }

  // dd = s X W^T into F (n x Mp) and rowdiag = s^2 |x|^2 / 2.
  void projections(const float* X, int n, float* F, float* diag, uint32_t* xp) const {
    nn(X, Dp, n, D, Wt.data(), Mp, at(Wtp, 0), Mp, F, Mp, xp);
    const v16f sv = vbroadcast(s);
    for (int t = 0; t < n; ++t) {
      float* f = F + (int64_t)t * Mp;
      for (int j = 0; j < Mp; j += kVec) vstore(f + j, vload(f + j) * sv);
      diag[t] = dot(X + (int64_t)t * Dp, X + (int64_t)t * Dp, Dp) * (s * s * 0.5f);
    }
  }

  float row_max(const float* f) const {  // over the m features (columns beyond m hold zeros)
    v16f acc = vbroadcast(-std::numeric_limits<float>::infinity());
    int j = 0;
    for (; j + kVec <= m; j += kVec) acc = vmax(acc, vload(f + j));
    float mx = biogen::vhmax(acc);
    for (; j < m; ++j) mx = std::max(mx, f[j]);
    return mx;
  }

  // In place: F (raw projections) -> E (exp part, or relu part); columns >= m set to 0.
  // c: the stabiliser for every row (keys) or nullptr for the per-row max (queries).
  void exp_part(float* F, const float* diag, int n, const float* c_all) const {
    for (int t = 0; t < n; ++t) {
      float* f = F + (int64_t)t * Mp;
      if (relu) {
        for (int j = 0; j < Mp; j += kVec) vstore(f + j, vmax(vload(f + j), vbroadcast(0.f)));
      } else {
        const float c = c_all ? *c_all : row_max(f);
        const v16f sh = vbroadcast(diag[t] + c);
        for (int j = 0; j < Mp; j += kVec) vstore(f + j, vexp(vload(f + j) - sh));
      }
      for (int j = m; j < Mp; ++j) f[j] = 0.f;
    }
  }

  // phi = ratio (E + eps) on columns < m, 0 beyond.
  void phi_from_e(const float* E, int n, float* P) const {
    for (int t = 0; t < n; ++t) {
      const float* e = E + (int64_t)t * Mp;
      float* p = P + (int64_t)t * Mp;
      const v16f r = vbroadcast(ratio), re = vbroadcast(ratio * eps);
      for (int j = 0; j < Mp; j += kVec) vstore(p + j, r * vload(e + j) + re);
      for (int j = m; j < Mp; ++j) p[j] = 0.f;
    }
  }

  // G = dphi * dphi/d(dd): ratio E (softmax) or [E > 0] (relu), in place on dP.
  void chain(float* dP, const float* E, int n) const {
    for (int t = 0; t < n; ++t) {
      float* g = dP + (int64_t)t * Mp;
      const float* e = E + (int64_t)t * Mp;
      if (relu) {
        for (int j = 0; j < Mp; j += kVec) vstore(g + j, vload(e + j) > 0.f ? vload(g + j) : vbroadcast(0.f));
      } else {
        const v16f r = vbroadcast(ratio);
        for (int j = 0; j < Mp; j += kVec) vstore(g + j, vload(g + j) * r * vload(e + j));
      }
    }
  }

  // dx = s G W - s^2 x sum_f G (softmax only) into dx rows (n x Dp).
  void input_grad(const float* G, const float* X, int n, float* dX, uint32_t* xp) const {
    nn(G, Mp, n, m, Wp.data(), Dp, at(Wpp, 0), Dp, dX, Dp, xp);
    for (int t = 0; t < n; ++t) {
      float* o = dX + (int64_t)t * Dp;
      v16f acc = vbroadcast(0.f);  // G is zero beyond m
      if (!relu)
        for (int j = 0; j < Mp; j += kVec) acc += vload(G + (int64_t)t * Mp + j);
      const v16f sv = vbroadcast(s), xs = vbroadcast(s * s * biogen::vsum(acc));
      const float* x = X + (int64_t)t * Dp;
      for (int d = 0; d < Dp; d += kVec) vstore(o + d, sv * vload(o + d) - xs * vload(x + d));
    }
  }
};

struct Tile {  // per-thread scratch
  std::vector<float> X, V, F, E, P, G, diag, tmp;
  std::vector<int> idx;
  std::vector<uint32_t> xp, vp;  // packed operands of the bf16 path
  Tile(int Dp, int Mp) : X(kTile * Dp), V(kTile * Dp), F(kTile * Mp), E(kTile * Mp), P(kTile * Mp),
                         G(kTile * Dp), diag(kTile), tmp(kTile * Dp), idx(kTile),
                         xp(kTile / 2 * std::max(Dp, Mp)), vp(kTile / 2 * Dp) {}
};

// Partial key state of one (b, h) over positions [l0, l1): exp-part sums relative to c, eps parts.
struct KeyState {
  float* A;   // Mp x Dp: sum E_j v_j^T
  float* zE;  // Mp: sum E_j
  float* sv;  // Dp: sum v_j
  float c, n;
};

template <class S>
void key_pass(const Problem<S>& P, const typename S::T* k, const int64_t* ks, const typename S::T* v,
              const int64_t* vs, int b, int h, int l0, int l1, Tile& w, KeyState& st) {
  st.c = -std::numeric_limits<float>::infinity();
  st.n = 0.f;
  std::fill(st.A, st.A + (size_t)P.Mp * P.Dp, 0.f);
  std::fill(st.zE, st.zE + P.Mp, 0.f);
  std::fill(st.sv, st.sv + P.Dp, 0.f);
  if (P.relu) st.c = 0.f;
  for (int t0 = l0; t0 < l1; t0 += kTile) {
    int n = 0;
    for (int l = t0; l < std::min(l1, t0 + kTile); ++l)
      if (P.valid(b, l)) w.idx[n++] = l;
    if (n == 0) continue;
    P.load(k, ks[0], ks[1], ks[2], b, h, w.idx.data(), n, w.X.data());
    P.load(v, vs[0], vs[1], vs[2], b, h, w.idx.data(), n, w.V.data());
    P.projections(w.X.data(), n, w.F.data(), w.diag.data(), w.xp.data());
    if (!P.relu) {
      float cm = st.c;
      for (int t = 0; t < n; ++t) cm = std::max(cm, P.row_max(w.F.data() + (int64_t)t * P.Mp));
      if (cm > st.c) {
        const float r = std::exp(st.c - cm);  // 0 on the first tile
        for (size_t i = 0; i < (size_t)P.Mp * P.Dp; ++i) st.A[i] *= r;
        for (int j = 0; j < P.Mp; ++j) st.zE[j] *= r;
        st.c = cm;
      }
    }
    P.exp_part(w.F.data(), w.diag.data(), n, &st.c);
    P.tn(w.F.data(), P.Mp, n, P.m, w.V.data(), P.Dp, P.NV, st.A, P.Dp, w.xp.data(), w.vp.data());
    for (int t = 0; t < n; ++t) {
      const float* e = w.F.data() + (int64_t)t * P.Mp;
      for (int j = 0; j < P.Mp; j += kVec) vstore(st.zE + j, vload(st.zE + j) + vload(e + j));
      const float* vv = w.V.data() + (int64_t)t * P.Dp;
      for (int d = 0; d < P.Dp; d += kVec) vstore(st.sv + d, vload(st.sv + d) + vload(vv + d));
    }
    st.n += (float)n;
  }
}

// Full (b, h) key state from `splits` partial ones: C = ratio (A + eps sv), z = ratio (zE + eps n).
template <class S>
void merge_states(const Problem<S>& P, const std::vector<KeyState>& parts, int first, int splits, float* C,
                  float* z, float* c_out) {
  float c = P.relu ? 0.f : -std::numeric_limits<float>::infinity();
  float n = 0.f;
  for (int i = 0; i < splits; ++i) {
    const KeyState& p = parts[first + i];
    if (p.n > 0) c = std::max(c, p.c);
    n += p.n;
  }
  const size_t MD = (size_t)P.Mp * P.Dp;
  std::fill(C, C + MD, 0.f);
  std::fill(z, z + P.Mp, 0.f);
  std::vector<float> sv(P.Dp, 0.f);
  for (int i = 0; i < splits; ++i) {
    const KeyState& p = parts[first + i];
    if (p.n == 0) continue;
    const float r = P.relu ? 1.f : std::exp(p.c - c);
    for (size_t j = 0; j < MD; ++j) C[j] += r * p.A[j];
    for (int j = 0; j < P.Mp; ++j) z[j] += r * p.zE[j];
    for (int d = 0; d < P.Dp; ++d) sv[d] += p.sv[d];
  }
  for (int f = 0; f < P.Mp; ++f) {
    float* row = C + (size_t)f * P.Dp;
    if (f >= P.m) {
      std::fill(row, row + P.Dp, 0.f);
      z[f] = 0.f;
      continue;
    }
    for (int d = 0; d < P.Dp; ++d) row[d] = P.ratio * (row[d] + P.eps * sv[d]);
    z[f] = P.ratio * (z[f] + P.eps * n);
  }
  *c_out = std::isfinite(c) ? c : 0.f;
}

// Key ranges per (b, h) when B*H is small: enough tasks for kSplitTasks threads. The count follows
// the shape alone, so the partial sums and their merge order (hence the bits of the result) are
// the same for any thread count.
constexpr int kSplitTasks = 32;
inline int key_splits(int BH, int nchunks) { return std::max(1, std::min(nchunks, (kSplitTasks + BH - 1) / BH)); }

// Key states of every (b, h): parallel over (b, h) and, when B*H is small, over key ranges too
// (partial states merged in range order with running-max rescaling).
template <class S>
void all_key_states(const Problem<S>& P, const typename S::T* k, const int64_t* ks, const typename S::T* v,
                    const int64_t* vs, int threads, std::vector<float>& C, std::vector<float>& z,
                    std::vector<float>& cst) {
  const int BH = P.B * P.H;
  const int nchunks = (P.L + kTile - 1) / kTile;
  const int splits = key_splits(BH, nchunks);
  const int per = (nchunks + splits - 1) / splits * kTile;
  const size_t MD = (size_t)P.Mp * P.Dp;
  std::vector<float> buf((size_t)BH * splits * (MD + P.Mp + P.Dp));
  std::vector<KeyState> parts((size_t)BH * splits);
  for (size_t i = 0; i < parts.size(); ++i) {
    float* base = buf.data() + i * (MD + P.Mp + P.Dp);
    parts[i] = KeyState{base, base + MD, base + MD + P.Mp, 0.f, 0.f};
  }
  C.assign((size_t)BH * MD, 0.f);
  z.assign((size_t)BH * P.Mp, 0.f);
  cst.assign(BH, 0.f);
#pragma omp parallel num_threads(threads)
  {
    Tile w(P.Dp, P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)BH * splits; ++task) {
      const int bh = (int)(task / splits), sp = (int)(task % splits);
      const int l0 = std::min(P.L, sp * per), l1 = std::min(P.L, l0 + per);
      key_pass(P, k, ks, v, vs, bh / P.H, bh % P.H, l0, l1, w, parts[task]);
    }
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < BH; ++bh)
      merge_states(P, parts, bh * splits, splits, C.data() + bh * MD, z.data() + (size_t)bh * P.Mp, &cst[bh]);
  }
}

// The forward's key states, kept for the backward: per (b, h), C (Mp x Dp), z (Mp), then the
// stabiliser: Mp * Dp + Mp + 1 floats (the size biogen/ops/performer.py allocates).
template <class S>
void save_key_states(const Problem<S>& P, const std::vector<float>& C, const std::vector<float>& z,
                     const std::vector<float>& cst, float* state) {
  const size_t MD = (size_t)P.Mp * P.Dp, per = MD + P.Mp + 1;
  for (int bh = 0; bh < P.B * P.H; ++bh) {
    float* s = state + bh * per;
    std::copy_n(C.data() + bh * MD, MD, s);
    std::copy_n(z.data() + (size_t)bh * P.Mp, P.Mp, s + MD);
    s[MD + P.Mp] = cst[bh];
  }
}

template <class S>
void load_key_states(const Problem<S>& P, const float* state, std::vector<float>& C, std::vector<float>& z,
                     std::vector<float>& cst) {
  const int BH = P.B * P.H;
  const size_t MD = (size_t)P.Mp * P.Dp, per = MD + P.Mp + 1;
  C.resize((size_t)BH * MD);
  z.resize((size_t)BH * P.Mp);
  cst.resize(BH);
  for (int bh = 0; bh < BH; ++bh) {
    const float* s = state + bh * per;
    std::copy_n(s, MD, C.data() + bh * MD);
    std::copy_n(s + MD, P.Mp, z.data() + (size_t)bh * P.Mp);
    cst[bh] = s[MD + P.Mp];
  }
}

// Valid rows of one tile of positions [t0, t0 + kTile).
template <class S>
int tile_rows(const Problem<S>& P, int b, int t0, int* idx) {
  int n = 0;
  for (int l = t0; l < std::min(P.L, t0 + kTile); ++l)
    if (P.valid(b, l)) idx[n++] = l;
  return n;
}

template <class S>
void store_row(const Problem<S>& P, typename S::T* out, int b, int h, int l, const float* src) {
  typename S::T* o = out + (((int64_t)b * P.H + h) * P.L + l) * P.D;
  for (int d = 0; d < P.D; ++d) S::store(o + d, src ? src[d] : 0.f);
}

struct Strides {
  int64_t q[3], k[3], v[3], o[3], g[3];
};

// ----------------------------------------------------------------------------- non-causal

template <class S>
void fwd_noncausal(const Problem<S>& P, const typename S::T* q, const typename S::T* k, const typename S::T* v,
                   typename S::T* out, float* ck, float* state, const Strides& st, int threads) {
  std::vector<float> C, z, cst;
  all_key_states(P, k, st.k, v, st.v, threads, C, z, cst);
  const int BH = P.B * P.H, nchunks = (P.L + kTile - 1) / kTile;
  const size_t MD = (size_t)P.Mp * P.Dp;
  if (state != nullptr) save_key_states(P, C, z, cst, state);
  const std::vector<uint32_t> C16 = P.pack_each(C, P.m, P.Dp);
  const size_t C16s = (size_t)(P.m + 1) / 2 * P.Dp;
#pragma omp parallel num_threads(threads)
  {
    Tile w(P.Dp, P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)BH * nchunks; ++task) {
      const int bh = (int)(task / nchunks), b = bh / P.H, h = bh % P.H, t0 = (int)(task % nchunks) * kTile;
      for (int l = t0; l < std::min(P.L, t0 + kTile); ++l)
        if (!P.valid(b, l)) store_row(P, out, b, h, l, nullptr);
      const int n = tile_rows(P, b, t0, w.idx.data());
      if (n == 0) continue;
      P.load(q, st.q[0], st.q[1], st.q[2], b, h, w.idx.data(), n, w.X.data());
      P.projections(w.X.data(), n, w.F.data(), w.diag.data(), w.xp.data());
      P.exp_part(w.F.data(), w.diag.data(), n, nullptr);
      P.phi_from_e(w.F.data(), n, w.P.data());
      P.nn(w.P.data(), P.Mp, n, P.m, C.data() + bh * MD, P.Dp, P.at(C16, bh * C16s), P.Dp, w.tmp.data(), P.Dp,
           w.xp.data());
      for (int t = 0; t < n; ++t) {
        const float inv = 1.f / dot(w.P.data() + (int64_t)t * P.Mp, z.data() + (size_t)bh * P.Mp, P.Mp);
        float* o = w.tmp.data() + (int64_t)t * P.Dp;
        for (int d = 0; d < P.Dp; ++d) o[d] *= inv;
        store_row(P, out, b, h, w.idx[t], o);
      }
    }
  }
  for (int bh = 0; bh < BH; ++bh) ck[bh] = cst[bh];
}

template <class S>
void bwd_noncausal(const Problem<S>& P, const typename S::T* q, const typename S::T* k, const typename S::T* v,
                   const typename S::T* out, const typename S::T* gout, typename S::T* dq, typename S::T* dk,
                   typename S::T* dv,
                   const float* state, const Strides& st, int threads) {
  std::vector<float> C, z, cst;
  if (state != nullptr)
    load_key_states(P, state, C, z, cst);  // saved by the forward: no second pass over the keys
  else
    all_key_states(P, k, st.k, v, st.v, threads, C, z, cst);
  const int BH = P.B * P.H, nchunks = (P.L + kTile - 1) / kTile;
  const size_t MD = (size_t)P.Mp * P.Dp;
  // C^T per (b, h) for dphi(q) = dnum C^T as a row-broadcast product.
  std::vector<float> CT((size_t)BH * P.Dp * P.Mp);
  for (int bh = 0; bh < BH; ++bh)
    for (int f = 0; f < P.Mp; ++f)
      for (int d = 0; d < P.Dp; ++d) CT[(size_t)bh * MD + (size_t)d * P.Mp + f] = C[(size_t)bh * MD + (size_t)f * P.Dp + d];
  const std::vector<uint32_t> CT16 = P.pack_each(CT, P.D, P.Mp);
  const size_t CT16s = (size_t)(P.D + 1) / 2 * P.Mp, C16s = (size_t)(P.m + 1) / 2 * P.Dp;
  // Query pass: dq, and dC = sum phi(q)^T dnum, dz = sum dden phi(q) in partial sums per split.
  const int splits = key_splits(BH, nchunks);
  const int per = (nchunks + splits - 1) / splits;
  std::vector<float> dCp((size_t)BH * splits * MD, 0.f), dzp((size_t)BH * splits * P.Mp, 0.f);
#pragma omp parallel num_threads(threads)
  {
    Tile w(P.Dp, P.Mp);
    std::vector<float> dden(kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)BH * splits; ++task) {
      const int bh = (int)(task / splits), sp = (int)(task % splits), b = bh / P.H, h = bh % P.H;
      float* dC = dCp.data() + task * MD;
      float* dz = dzp.data() + task * P.Mp;
      for (int c = sp * per; c < std::min(nchunks, (sp + 1) * per); ++c) {
        const int t0 = c * kTile;
        for (int l = t0; l < std::min(P.L, t0 + kTile); ++l)
          if (!P.valid(b, l)) store_row(P, dq, b, h, l, nullptr);
        const int n = tile_rows(P, b, t0, w.idx.data());
        if (n == 0) continue;
        P.load(q, st.q[0], st.q[1], st.q[2], b, h, w.idx.data(), n, w.X.data());
        P.load(gout, st.g[0], st.g[1], st.g[2], b, h, w.idx.data(), n, w.V.data());   // dO
        P.load(out, st.o[0], st.o[1], st.o[2], b, h, w.idx.data(), n, w.tmp.data());  // O
        P.projections(w.X.data(), n, w.F.data(), w.diag.data(), w.xp.data());
        P.exp_part(w.F.data(), w.diag.data(), n, nullptr);
        P.phi_from_e(w.F.data(), n, w.P.data());
        for (int t = 0; t < n; ++t) {
          const float den = dot(w.P.data() + (int64_t)t * P.Mp, z.data() + (size_t)bh * P.Mp, P.Mp);
          float* g = w.V.data() + (int64_t)t * P.Dp;
          dden[t] = -dot(g, w.tmp.data() + (int64_t)t * P.Dp, P.Dp) / den;
          const float inv = 1.f / den;
          for (int d = 0; d < P.Dp; ++d) g[d] *= inv;  // dO -> dnum
        }
        // dphi(q) = dnum C^T + dden z  (into G-sized buffer E? reuse w.G needs Mp: use F after chain)
        std::vector<float>& dP = w.E;
        P.nn(w.V.data(), P.Dp, n, P.D, CT.data() + bh * MD, P.Mp, P.at(CT16, bh * CT16s), P.Mp, dP.data(), P.Mp,
             w.xp.data());
        for (int t = 0; t < n; ++t) {
          float* r = dP.data() + (int64_t)t * P.Mp;
          const float* zz = z.data() + (size_t)bh * P.Mp;
          const v16f dd = vbroadcast(dden[t]);
          for (int j = 0; j < P.Mp; j += kVec) vstore(r + j, vload(r + j) + dd * vload(zz + j));
        }
        P.tn(w.P.data(), P.Mp, n, P.m, w.V.data(), P.Dp, P.NV, dC, P.Dp, w.xp.data(), w.vp.data());
        for (int t = 0; t < n; ++t) {
          const v16f dd = vbroadcast(dden[t]);
          const float* p = w.P.data() + (int64_t)t * P.Mp;
          for (int j = 0; j < P.Mp; j += kVec) vstore(dz + j, vload(dz + j) + dd * vload(p + j));
        }
        P.chain(dP.data(), w.F.data(), n);
        P.input_grad(dP.data(), w.X.data(), n, w.tmp.data(), w.xp.data());
        for (int t = 0; t < n; ++t) store_row(P, dq, b, h, w.idx[t], w.tmp.data() + (int64_t)t * P.Dp);
      }
    }
  }
  // Reduce the partial dC, dz; keep dC and dC^T.
  std::vector<float> dC((size_t)BH * MD, 0.f), dCT((size_t)BH * MD, 0.f), dz((size_t)BH * P.Mp, 0.f);
  for (int bh = 0; bh < BH; ++bh)
    for (int sp = 0; sp < splits; ++sp) {
      const size_t task = (size_t)bh * splits + sp;
      for (size_t j = 0; j < MD; ++j) dC[bh * MD + j] += dCp[task * MD + j];
      for (int j = 0; j < P.Mp; ++j) dz[(size_t)bh * P.Mp + j] += dzp[task * P.Mp + j];
    }
  for (int bh = 0; bh < BH; ++bh)
    for (int f = 0; f < P.Mp; ++f)
      for (int d = 0; d < P.Dp; ++d) dCT[(size_t)bh * MD + (size_t)d * P.Mp + f] = dC[(size_t)bh * MD + (size_t)f * P.Dp + d];
  const std::vector<uint32_t> dC16 = P.pack_each(dC, P.m, P.Dp), dCT16 = P.pack_each(dCT, P.D, P.Mp);
  // Key pass: dphi(k) = v dC^T + dz, dv = phi(k) dC, dk through the features (stabiliser constant).
#pragma omp parallel num_threads(threads)
  {
    Tile w(P.Dp, P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)BH * nchunks; ++task) {
      const int bh = (int)(task / nchunks), b = bh / P.H, h = bh % P.H, t0 = (int)(task % nchunks) * kTile;
      for (int l = t0; l < std::min(P.L, t0 + kTile); ++l)
        if (!P.valid(b, l)) {
          store_row(P, dk, b, h, l, nullptr);
          store_row(P, dv, b, h, l, nullptr);
        }
      const int n = tile_rows(P, b, t0, w.idx.data());
      if (n == 0) continue;
      P.load(k, st.k[0], st.k[1], st.k[2], b, h, w.idx.data(), n, w.X.data());
      P.load(v, st.v[0], st.v[1], st.v[2], b, h, w.idx.data(), n, w.V.data());
      P.projections(w.X.data(), n, w.F.data(), w.diag.data(), w.xp.data());
      P.exp_part(w.F.data(), w.diag.data(), n, &cst[bh]);
      P.phi_from_e(w.F.data(), n, w.P.data());
      P.nn(w.P.data(), P.Mp, n, P.m, dC.data() + bh * MD, P.Dp, P.at(dC16, bh * C16s), P.Dp, w.tmp.data(), P.Dp,
           w.xp.data());
      for (int t = 0; t < n; ++t) store_row(P, dv, b, h, w.idx[t], w.tmp.data() + (int64_t)t * P.Dp);
      std::vector<float>& dP = w.E;
      P.nn(w.V.data(), P.Dp, n, P.D, dCT.data() + bh * MD, P.Mp, P.at(dCT16, bh * CT16s), P.Mp, dP.data(), P.Mp,
           w.xp.data());
      for (int t = 0; t < n; ++t) {
        float* r = dP.data() + (int64_t)t * P.Mp;
        const float* zz = dz.data() + (size_t)bh * P.Mp;
        for (int j = 0; j < P.Mp; j += kVec) vstore(r + j, vload(r + j) + vload(zz + j));
      }
      P.chain(dP.data(), w.F.data(), n);
      P.input_grad(dP.data(), w.X.data(), n, w.tmp.data(), w.xp.data());
      for (int t = 0; t < n; ++t) store_row(P, dk, b, h, w.idx[t], w.tmp.data() + (int64_t)t * P.Dp);
    }
  }
}

// ----------------------------------------------------------------------------- causal
//
// Chunked prefix sums (as in "Transformers are RNNs" and chunked linear attention): positions are
// taken kTile at a time; with A = tril(phi(Q_c) phi(K_c)^T) the chunk's own C x C scores,
//   num_c = phi(Q_c) S + A V_c,   den_c = phi(Q_c) (z + 1e-6) + rowsum(A),
// where S (m x D) and z (m) are sum phi(k_j) v_j^T and sum phi(k_j) over earlier chunks; then
// S += phi(K_c)^T V_c. Every product is matrix-shaped (gemm_nn / gemm_tn_acc); features exist one
// chunk at a time and are recomputed in the backward.

// dst (cols x kTile) = src (n x cols, ld lds)^T; columns n.. of dst are zero.
inline void transpose_rows(const float* src, int lds, int n, int cols, float* dst) {
  for (int c = 0; c < cols; ++c) {
    float* o = dst + (int64_t)c * kTile;
    for (int r = 0; r < n; ++r) o[r] = src[(int64_t)r * lds + c];
    for (int r = n; r < kTile; ++r) o[r] = 0.f;
  }
}

// A[F x ncols] += X^T V for any ncols that is a multiple of 16 (gemm_tn_acc takes at most 8 vectors).
void gemm_tn_acc_wide(const float* X, int ldx, int rows, int F, const float* V, int ldv, int ncols, float* A,
                      int lda) {
  for (int c = 0; c < ncols; c += 8 * kVec)
    gemm_tn_acc(X, ldx, rows, F, V + c, ldv, std::min(8, (ncols - c) / kVec), A + c, lda);
}

// Keeps the lower (lower = true: j <= i) or upper (j >= i) triangle of an n x kTile score block.
inline void keep_triangle(float* A, int n, bool lower) {
  for (int i = 0; i < n; ++i) {
    float* row = A + (int64_t)i * kTile;
    if (lower)
      std::fill(row + i + 1, row + kTile, 0.f);
    else
      std::fill(row, row + i, 0.f);
  }
}

// One chunk's inputs and features; rows that are padding are zero in X, V, phi (never NaN).
template <class S>
struct CausalTile {
  std::vector<float> Xq, Xk, V, Eq, Ek, Pq, Pk, dO, O, dnum, Y1, Y2, G1, G2, T1, T2, A, diag_q, diag_k, den, dden;
  std::vector<int> idx, valid;
  CausalTile(int Dp, int Mp)
      : Xq(kTile * Dp), Xk(kTile * Dp), V(kTile * Dp), Eq(kTile * Mp), Ek(kTile * Mp), Pq(kTile * Mp),
        Pk(kTile * Mp), dO(kTile * Dp), O(kTile * Dp), dnum(kTile * Dp), Y1(kTile * Dp), Y2(kTile * Dp),
        G1(kTile * Mp), G2(kTile * Mp), T1((size_t)Mp * kTile), T2((size_t)Dp * kTile), A(kTile * kTile),
        diag_q(kTile), diag_k(kTile), den(kTile), dden(kTile), idx(kTile), valid(kTile) {}

  // Rows t0 .. t0 + n of one (b, h): row t is position t0 + t.
  int fill(const Problem<S>& P, const typename S::T* q, const typename S::T* k, const typename S::T* v,
           const Strides& st, int b, int h, int t0, float ck) {
    const int n = std::min(kTile, P.L - t0);
    for (int t = 0; t < n; ++t) {
      idx[t] = t0 + t;
      valid[t] = P.valid(b, t0 + t);
    }
    P.load(q, st.q[0], st.q[1], st.q[2], b, h, idx.data(), n, Xq.data());
    P.load(k, st.k[0], st.k[1], st.k[2], b, h, idx.data(), n, Xk.data());
    P.load(v, st.v[0], st.v[1], st.v[2], b, h, idx.data(), n, V.data());
    zero_padding(P, n, Xq);
    zero_padding(P, n, Xk);
    zero_padding(P, n, V);
    P.projections(Xq.data(), n, Eq.data(), diag_q.data(), nullptr);
    P.exp_part(Eq.data(), diag_q.data(), n, nullptr);
    P.phi_from_e(Eq.data(), n, Pq.data());
    P.projections(Xk.data(), n, Ek.data(), diag_k.data(), nullptr);
    P.exp_part(Ek.data(), diag_k.data(), n, &ck);
    P.phi_from_e(Ek.data(), n, Pk.data());
    for (int t = 0; t < n; ++t)
      if (!valid[t]) {
        std::fill(Pq.begin() + t * P.Mp, Pq.begin() + (t + 1) * P.Mp, 0.f);
        std::fill(Pk.begin() + t * P.Mp, Pk.begin() + (t + 1) * P.Mp, 0.f);
      }
    return n;
  }

  // Padding may hold anything (NaN): never let it reach the maths.
  void zero_padding(const Problem<S>& P, int n, std::vector<float>& X) const {
    for (int t = 0; t < n; ++t)
      if (!valid[t]) std::fill(X.begin() + t * P.Dp, X.begin() + (t + 1) * P.Dp, 0.f);
  }

  // A = tril(phi(Q_c) phi(K_c)^T) and den = phi(Q_c) (z + 1e-6) + rowsum(A) (1 on padding).
  void scores_and_den(const Problem<S>& P, int n, const float* z) {
    transpose_rows(Pk.data(), P.Mp, n, P.Mp, T1.data());
    gemm_nn(Pq.data(), P.Mp, n, P.m, T1.data(), kTile, round_up(n, kVec), A.data(), kTile);
    keep_triangle(A.data(), n, true);
    for (int i = 0; i < n; ++i) {
      if (!valid[i]) {
        den[i] = 1.f;
        continue;
      }
      const float* pq = Pq.data() + (int64_t)i * P.Mp;
      float d = 0.f;
      for (int f = 0; f < P.m; ++f) d += pq[f] * (z[f] + kCausalEps);
      for (int j = 0; j <= i; ++j) d += A[(int64_t)i * kTile + j];
      den[i] = d;
    }
  }

  // dO and O of the chunk; dnum = dO / den, dden = -(dO . O) / den (0 on padding).
  void output_grads(const Problem<S>& P, const typename S::T* out, const typename S::T* gout, const Strides& st,
                    int b, int h, int n) {
    P.load(gout, st.g[0], st.g[1], st.g[2], b, h, idx.data(), n, dO.data());
    P.load(out, st.o[0], st.o[1], st.o[2], b, h, idx.data(), n, O.data());
    zero_padding(P, n, dO);
    zero_padding(P, n, O);
    for (int t = 0; t < n; ++t) {
      const float* g = dO.data() + (int64_t)t * P.Dp;
      float* dn = dnum.data() + (int64_t)t * P.Dp;
      const float inv = 1.f / den[t];
      dden[t] = valid[t] ? -dot(g, O.data() + (int64_t)t * P.Dp, P.Dp) * inv : 0.f;
      for (int d = 0; d < P.Dp; ++d) dn[d] = g[d] * inv;
    }
  }
};

// The key stabiliser alone: max over valid keys and features of s k.W_f per (b, h), from the same
// projections as all_key_states (so the same values), without its exp and state sums. 0 for relu
// and for a (b, h) with no valid key. Tiles in parallel; a max does not depend on their order.
template <class S>
void causal_stabilisers(const Problem<S>& P, const typename S::T* k, const Strides& st, int threads,
                        std::vector<float>& cst) {
  const int BH = P.B * P.H, nchunks = (P.L + kTile - 1) / kTile;
  cst.assign(BH, 0.f);
  if (P.relu) return;
  std::vector<float> part((size_t)BH * nchunks, -std::numeric_limits<float>::infinity());
#pragma omp parallel num_threads(threads)
  {
    Tile w(P.Dp, P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)BH * nchunks; ++task) {
      const int bh = (int)(task / nchunks), b = bh / P.H, h = bh % P.H, t0 = (int)(task % nchunks) * kTile;
      const int n = tile_rows(P, b, t0, w.idx.data());
      if (n == 0) continue;
      P.load(k, st.k[0], st.k[1], st.k[2], b, h, w.idx.data(), n, w.X.data());
      P.projections(w.X.data(), n, w.F.data(), w.diag.data(), w.xp.data());
      for (int t = 0; t < n; ++t) part[task] = std::max(part[task], P.row_max(w.F.data() + (int64_t)t * P.Mp));
    }
  }
  for (int bh = 0; bh < BH; ++bh) {
    const float c = *std::max_element(part.begin() + (size_t)bh * nchunks, part.begin() + (size_t)(bh + 1) * nchunks);
    cst[bh] = std::isfinite(c) ? c : 0.f;
  }
}

inline void add_rows(float* acc, const float* P, int n, int ld, int cols) {  // acc[cols] += sum of n rows
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < cols; j += kVec) vstore(acc + j, vload(acc + j) + vload(P + (int64_t)t * ld + j));
}

template <class S>
void fwd_causal(const Problem<S>& P, const typename S::T* q, const typename S::T* k, const typename S::T* v,
                typename S::T* out, float* ck, const Strides& st, int threads) {
  std::vector<float> cst;
  causal_stabilisers(P, k, st, threads, cst);
  const int BH = P.B * P.H;
#pragma omp parallel num_threads(threads)
  {
    CausalTile<S> w(P.Dp, P.Mp);
    std::vector<float> Sm((size_t)P.Mp * P.Dp), z(P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < BH; ++bh) {
      const int b = bh / P.H, h = bh % P.H;
      std::fill(Sm.begin(), Sm.end(), 0.f);
      std::fill(z.begin(), z.end(), 0.f);
      for (int t0 = 0; t0 < P.L; t0 += kTile) {
        const int n = w.fill(P, q, k, v, st, b, h, t0, cst[bh]);
        w.scores_and_den(P, n, z.data());
        gemm_nn(w.Pq.data(), P.Mp, n, P.m, Sm.data(), P.Dp, P.Dp, w.Y1.data(), P.Dp);  // earlier chunks
        gemm_nn(w.A.data(), kTile, n, n, w.V.data(), P.Dp, P.Dp, w.Y2.data(), P.Dp);   // this chunk
        for (int t = 0; t < n; ++t) {
          float* o = w.Y1.data() + (int64_t)t * P.Dp;
          const float* o2 = w.Y2.data() + (int64_t)t * P.Dp;
          const float inv = 1.f / w.den[t];
          for (int d = 0; d < P.Dp; ++d) o[d] = (o[d] + o2[d]) * inv;
          store_row(P, out, b, h, t0 + t, w.valid[t] ? o : nullptr);
        }
        gemm_tn_acc(w.Pk.data(), P.Mp, n, P.m, w.V.data(), P.Dp, P.NV, Sm.data(), P.Dp);
        add_rows(z.data(), w.Pk.data(), n, P.Mp, P.Mp);
      }
    }
  }
  for (int bh = 0; bh < BH; ++bh) ck[bh] = cst[bh];
}

// With M = tril(dnum V^T + dden) over the whole sequence (reference.performer_attention_bwd_ref):
// dphi(q_i) = S_i dnum_i + dden_i (z_i + 1e-6) with S_i, z_i the prefix sums up to i, i.e. earlier
// chunks' S, z plus this chunk's M_c phi(K_c); dphi(k_j) = R_j v_j + r_j and dv_j = R_j^T phi(k_j)
// with R_j = sum_{i >= j} phi(q_i) dnum_i^T, r_j = sum_{i >= j} dden_i phi(q_i): later chunks' R, r
// (a reverse pass) plus this chunk's M_c^T phi(Q_c) and triu(phi(K_c) phi(Q_c)^T) dnum_c.
template <class S>
void bwd_causal(const Problem<S>& P, const typename S::T* q, const typename S::T* k, const typename S::T* v,
                const typename S::T* out, const typename S::T* gout, typename S::T* dq, typename S::T* dk,
                   typename S::T* dv,
                const Strides& st, int threads) {
  std::vector<float> cst;
  causal_stabilisers(P, k, st, threads, cst);
  const int BH = P.B * P.H;
  const size_t MD = (size_t)P.Mp * P.Dp;
  std::vector<float> den_all((size_t)BH * P.L, 1.f);
#pragma omp parallel num_threads(threads)
  {
    CausalTile<S> w(P.Dp, P.Mp);
    std::vector<float> ST(MD), R(MD), RT(MD), z(P.Mp), r(P.Mp);
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < BH; ++bh) {
      const int b = bh / P.H, h = bh % P.H;
      float* den_bh = den_all.data() + (size_t)bh * P.L;
      // Forward direction: dq. ST = S^T (Dp x Mp) so that dnum S^T is a row-broadcast product.
      std::fill(ST.begin(), ST.end(), 0.f);
      std::fill(z.begin(), z.end(), 0.f);
      for (int t0 = 0; t0 < P.L; t0 += kTile) {
        const int n = w.fill(P, q, k, v, st, b, h, t0, cst[bh]);
        const int nc = round_up(n, kVec);
        w.scores_and_den(P, n, z.data());
        std::copy(w.den.begin(), w.den.begin() + n, den_bh + t0);
        w.output_grads(P, out, gout, st, b, h, n);
        // M_c = tril(dnum V_c^T + dden), kept in A (the scores are no longer needed)
        transpose_rows(w.V.data(), P.Dp, n, P.Dp, w.T2.data());
        gemm_nn(w.dnum.data(), P.Dp, n, P.D, w.T2.data(), kTile, nc, w.A.data(), kTile);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j <= i; ++j) w.A[(int64_t)i * kTile + j] += w.dden[i];
        keep_triangle(w.A.data(), n, true);
        gemm_nn(w.dnum.data(), P.Dp, n, P.D, ST.data(), P.Mp, P.Mp, w.G1.data(), P.Mp);
        gemm_nn(w.A.data(), kTile, n, n, w.Pk.data(), P.Mp, P.Mp, w.G2.data(), P.Mp);
        for (int t = 0; t < n; ++t) {
          float* g = w.G1.data() + (int64_t)t * P.Mp;
          const float* g2 = w.G2.data() + (int64_t)t * P.Mp;
          for (int f = 0; f < P.m; ++f) g[f] += g2[f] + w.dden[t] * (z[f] + kCausalEps);
        }
        P.chain(w.G1.data(), w.Eq.data(), n);
        P.input_grad(w.G1.data(), w.Xq.data(), n, w.Y1.data(), nullptr);
        for (int t = 0; t < n; ++t)
          store_row(P, dq, b, h, t0 + t, w.valid[t] ? w.Y1.data() + (int64_t)t * P.Dp : nullptr);
        gemm_tn_acc_wide(w.V.data(), P.Dp, n, P.D, w.Pk.data(), P.Mp, P.Mp, ST.data(), P.Mp);
        add_rows(z.data(), w.Pk.data(), n, P.Mp, P.Mp);
      }
      // Reverse direction: dk, dv.
      std::fill(R.begin(), R.end(), 0.f);
      std::fill(RT.begin(), RT.end(), 0.f);
      std::fill(r.begin(), r.end(), 0.f);
      for (int t0 = (P.L - 1) / kTile * kTile; t0 >= 0; t0 -= kTile) {
        const int n = w.fill(P, q, k, v, st, b, h, t0, cst[bh]);
        const int nc = round_up(n, kVec);
        std::copy(den_bh + t0, den_bh + t0 + n, w.den.begin());
        w.output_grads(P, out, gout, st, b, h, n);
        // dv = phi(K_c) R + triu(phi(K_c) phi(Q_c)^T) dnum_c
        transpose_rows(w.Pq.data(), P.Mp, n, P.Mp, w.T1.data());
        gemm_nn(w.Pk.data(), P.Mp, n, P.m, w.T1.data(), kTile, nc, w.A.data(), kTile);
        keep_triangle(w.A.data(), n, false);
        gemm_nn(w.Pk.data(), P.Mp, n, P.m, R.data(), P.Dp, P.Dp, w.Y1.data(), P.Dp);
        gemm_nn(w.A.data(), kTile, n, n, w.dnum.data(), P.Dp, P.Dp, w.Y2.data(), P.Dp);
        for (int t = 0; t < n; ++t) {
          float* o = w.Y1.data() + (int64_t)t * P.Dp;
          const float* o2 = w.Y2.data() + (int64_t)t * P.Dp;
          for (int d = 0; d < P.Dp; ++d) o[d] += o2[d];
          store_row(P, dv, b, h, t0 + t, w.valid[t] ? o : nullptr);
        }
        // dphi(k) = V_c R^T + r + M_c^T phi(Q_c), M_c^T = triu(V_c dnum_c^T + dden^T)
        transpose_rows(w.dnum.data(), P.Dp, n, P.Dp, w.T2.data());
        gemm_nn(w.V.data(), P.Dp, n, P.D, w.T2.data(), kTile, nc, w.A.data(), kTile);
        for (int j = 0; j < n; ++j)
          for (int i = j; i < n; ++i) w.A[(int64_t)j * kTile + i] += w.dden[i];
        keep_triangle(w.A.data(), n, false);
        gemm_nn(w.V.data(), P.Dp, n, P.D, RT.data(), P.Mp, P.Mp, w.G1.data(), P.Mp);
        gemm_nn(w.A.data(), kTile, n, n, w.Pq.data(), P.Mp, P.Mp, w.G2.data(), P.Mp);
        for (int t = 0; t < n; ++t) {
          float* g = w.G1.data() + (int64_t)t * P.Mp;
          const float* g2 = w.G2.data() + (int64_t)t * P.Mp;
          for (int f = 0; f < P.m; ++f) g[f] += g2[f] + r[f];
        }
        P.chain(w.G1.data(), w.Ek.data(), n);
        P.input_grad(w.G1.data(), w.Xk.data(), n, w.Y1.data(), nullptr);
        for (int t = 0; t < n; ++t)
          store_row(P, dk, b, h, t0 + t, w.valid[t] ? w.Y1.data() + (int64_t)t * P.Dp : nullptr);
        gemm_tn_acc(w.Pq.data(), P.Mp, n, P.m, w.dnum.data(), P.Dp, P.NV, R.data(), P.Dp);
        gemm_tn_acc_wide(w.dnum.data(), P.Dp, n, P.D, w.Pq.data(), P.Mp, P.Mp, RT.data(), P.Mp);
        for (int t = 0; t < n; ++t) {
          const v16f dd = vbroadcast(w.dden[t]);
          const float* p = w.Pq.data() + (int64_t)t * P.Mp;
          for (int j = 0; j < P.Mp; j += kVec) vstore(r.data() + j, vload(r.data() + j) + dd * vload(p + j));
        }
      }
    }
  }
}

template <class S>
Problem<S> make_problem(const float* W, const uint8_t* pad, int B, int H, int L, int D, int m, int relu, float eps,
                        bool causal) {
  Problem<S> P;
  P.dot16 = BIOGEN_BF16_DOT && std::is_same_v<S, biogen::BF16> && !causal &&
            biogen::cpu_capability() == biogen::CpuCap::avx512_bf16;
  P.B = B; P.H = H; P.L = L; P.D = D; P.m = m;
  P.s = std::pow((float)D, -0.25f);
  P.relu = relu != 0;
  P.ratio = P.relu ? 1.f : 1.f / std::sqrt((float)m);
  P.eps = eps;
  P.pad = pad;
  P.init(W);
  return P;
}

}  // namespace

void performer_fwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out, uintptr_t ck,
                   uintptr_t state, uintptr_t pad, int B, int H, int L, int D, int m, int64_t qsb, int64_t qsh, int64_t qsl,
                   int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb, int64_t vsh, int64_t vsl, int causal,
                   int relu, float eps, int threads) {
  // projections of q and k, the key state and the output: ~6 B H L m D flops
  threads = biogen::threads_for(threads, 6.0 * B * H * L * m * D, biogen::kGrainFlops);
  Strides st{{qsb, qsh, qsl}, {ksb, ksh, ksl}, {vsb, vsh, vsl}, {0, 0, 0}, {0, 0, 0}};
  biogen::dispatch_float_types(dtype, "performer_attention", [&]<class S>() {
    using T = typename S::T;
    auto P = make_problem<S>((const float*)proj, (const uint8_t*)pad, B, H, L, D, m, relu, eps, causal != 0);
    if (causal)
      fwd_causal(P, (const T*)q, (const T*)k, (const T*)v, (T*)out, (float*)ck, st, threads);
    else
      fwd_noncausal(P, (const T*)q, (const T*)k, (const T*)v, (T*)out, (float*)ck, (float*)state, st, threads);
  });
}

void performer_bwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                   uintptr_t gout, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, uintptr_t state, int B,
                   int H, int L,
                   int D, int m, int64_t qsb, int64_t qsh, int64_t qsl, int64_t ksb, int64_t ksh, int64_t ksl,
                   int64_t vsb, int64_t vsh, int64_t vsl, int64_t osb, int64_t osh, int64_t osl, int64_t gsb,
                   int64_t gsh, int64_t gsl, int causal, int relu, float eps, int threads) {
  threads = biogen::threads_for(threads, 14.0 * B * H * L * m * D, biogen::kGrainFlops);
  Strides st{{qsb, qsh, qsl}, {ksb, ksh, ksl}, {vsb, vsh, vsl}, {osb, osh, osl}, {gsb, gsh, gsl}};
  biogen::dispatch_float_types(dtype, "performer_attention", [&]<class S>() {
    using T = typename S::T;
    auto P = make_problem<S>((const float*)proj, (const uint8_t*)pad, B, H, L, D, m, relu, eps, causal != 0);
    if (causal)
      bwd_causal(P, (const T*)q, (const T*)k, (const T*)v, (const T*)out, (const T*)gout, (T*)dq, (T*)dk, (T*)dv, st, threads);
    else
      bwd_noncausal(P, (const T*)q, (const T*)k, (const T*)v, (const T*)out, (const T*)gout, (T*)dq, (T*)dk, (T*)dv, (const float*)state, st, threads);
  });
}

}  // namespace BIOGEN_CPU_NS
