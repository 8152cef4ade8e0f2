// Masked gene attention (SPEC 1.1) on the CPU: forward and backward, OpenMP over tiles, SIMD through
// the v16f vector type. Compiled once per ISA into BIOGEN_CPU_NS (see cpu_dispatch.h).
//
// The generative mask is handled exactly without any per-element mask: per cell, every valid query
// attends the dense set of "known keys" (valid and known) with an online softmax, and each unknown
// valid query then folds in its one extra key, itself. Known queries are among the known keys, so
// they already see themselves. Padded positions are never read, so NaN stored there cannot leak.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "biogen/common.h"
#include "biogen/parallel.h"
#include "biogen/vec.h"

namespace BIOGEN_CPU_NS {

using namespace biogen;

namespace {

// Tile sizes: 64 queries x 64 keys keeps Q, K^T, V, S and O for D = 64 (about 80 KiB) in L2 and the
// key tile (16 KiB) in L1 while the micro-kernel streams it. 128-key tiles measured no faster.
constexpr int kBq = 64;
constexpr int kBk = 64;

// Register blocking of the micro-kernel: kR rows x (16 * NV) columns of accumulators. v16f is one
// zmm (32 registers), two ymm (16) or four xmm (16), so the widest NV that leaves room for the B
// row and the broadcast A scalar differs per ISA.
#if defined(__AVX512F__)
constexpr int kR = 4;
constexpr int kMaxNV = 4;  // 16 accumulators + 4 B vectors + 1 broadcast of 32 zmm
#elif defined(__AVX2__)
constexpr int kR = 4;
constexpr int kMaxNV = 1;  // 8 ymm accumulators + 2 for B + 1 broadcast of 16
#else
constexpr int kR = 2;
constexpr int kMaxNV = 1;  // 8 xmm accumulators + 4 for B + 1 broadcast of 16
#endif

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A broadcast straight from memory (vbroadcastss); vec.h's vbroadcast computes 0 + x first, an extra
// dependent add in the innermost loop.
inline v16f bcast(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// Horizontal max / sum as shuffle trees: vec.h's scalar loops cost a fifth of the forward when run
// once per row per key block.
inline float hmax_tree(v16f v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
inline float hsum_tree(v16f v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// exp(x) for the softmax, where x <= 0 always (scores minus their running max, or minus lse).
// Leaner than vec.h's general vexp (a third fewer vector ops; exp is ~1/5 of the forward): no
// upper clamp, and the lower clamp at -88 makes 2^n's biased exponent 0, so exp(-inf) = 0 exactly
// and x < -87.3 flushes to 0 (below float resolution next to the row's max term, which is 1).
// NaN propagates: the clamp keeps it and the polynomial turns it into NaN.
inline v16f exp_nonpos(v16f x) {
  const v16f lo = bcast(-88.0f);
  x = x < lo ? lo : x;
  const v16f magic = bcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const v16f nm = x * 1.44269504088896341f + magic;
  const v16f n = nm - magic;
  v16f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = bcast(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  v16i bits;
  std::memcpy(&bits, &nm, sizeof(bits));
  bits = (bits - (0x4B400000 - 127)) << 23;  // n + 127 in the exponent field
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// 64-byte aligned float buffer, zero-filled so that padding lanes read as 0 and never as NaN.
struct Buf {
  float* p = nullptr;
  explicit Buf(size_t n) {
    const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// C[R x 16NV] (+)= A[R x K] . B[K x 16NV] with the accumulators in registers. A is read as broadcast
// scalars, element (r, k) at A[r*lda + k], or at A[k*lda + r] when AT (so P^T and dS^T need no
// explicit transpose). B rows and C rows are 64-byte aligned (ldb, ldc multiples of 16).
template <int R, int NV, bool AT>
inline void micro(int K, const float* __restrict A, int lda, const float* __restrict B, int ldb,
                  float* __restrict C, int ldc, bool acc) {
  v16f c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) c[r][n] = acc ? *(const v16f*)(C + r * ldc + 16 * n) : vbroadcast(0.f);
  for (int k = 0; k < K; ++k) {
    const float* b = B + (size_t)k * ldb;
    v16f bv[NV];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) bv[n] = *(const v16f*)(b + 16 * n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const v16f a = bcast(AT ? A[(size_t)k * lda + r] : A[(size_t)r * lda + k]);
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) c[r][n] += a * bv[n];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) *(v16f*)(C + r * ldc + 16 * n) = c[r][n];
}

// C[M x N] (+)= A[M x K] . B[K x N]; M a multiple of kR, N a multiple of 16. Column panels outer so
// one K x 64 panel of B stays in L1 while all row blocks stream past it.
template <bool AT>
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  auto arow = [&](int m) { return AT ? A + m : A + (size_t)m * lda; };
  int n0 = 0;
  while (n0 < N) {
    const int left = (N - n0) / 16;
    if (kMaxNV >= 4 && left >= 4) {
      for (int m = 0; m < M; m += kR) micro<kR, (kMaxNV >= 4 ? 4 : 1), AT>(K, arow(m), lda, B + n0, ldb, C + (size_t)m * ldc + n0, ldc, acc);
      n0 += 16 * (kMaxNV >= 4 ? 4 : 1);
    } else if (kMaxNV >= 2 && left >= 2) {
      for (int m = 0; m < M; m += kR) micro<kR, (kMaxNV >= 2 ? 2 : 1), AT>(K, arow(m), lda, B + n0, ldb, C + (size_t)m * ldc + n0, ldc, acc);
      n0 += 16 * (kMaxNV >= 2 ? 2 : 1);
    } else {
      for (int m = 0; m < M; m += kR) micro<kR, 1, AT>(K, arow(m), lda, B + n0, ldb, C + (size_t)m * ldc + n0, ldc, acc);
      n0 += 16;
    }
  }
}

inline float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Per cell (batch element): the valid queries and the known keys, as position lists.
struct CellLists {
  std::vector<int> valid_off, valid, known_off, known;
  std::vector<uint8_t> unknown;  // B x L: valid and not known (gets the self term)
  CellLists(const uint8_t* pad, const uint8_t* known_mask, int64_t B, int64_t L)
      : valid_off(B + 1), known_off(B + 1), unknown((size_t)(B * L), 0) {
    valid.reserve((size_t)(B * L));
    known.reserve((size_t)(B * L));
    for (int64_t b = 0; b < B; ++b) {
      valid_off[b] = (int)valid.size();
      known_off[b] = (int)known.size();
      for (int64_t i = 0; i < L; ++i) {
        const bool ok = pad == nullptr || pad[b * L + i] == 0;
        if (!ok) continue;
        valid.push_back((int)i);
        const bool kn = known_mask == nullptr || known_mask[b * L + i] != 0;
        if (kn) known.push_back((int)i);
        else unknown[b * L + i] = 1;
      }
    }
    valid_off[B] = (int)valid.size();
    known_off[B] = (int)known.size();
  }
  int nvalid(int64_t b) const { return valid_off[b + 1] - valid_off[b]; }
  int nknown(int64_t b) const { return known_off[b + 1] - known_off[b]; }
};

struct Strides {
  int64_t b, h, l;
};

template <typename S>
inline void load_row(const typename S::T* src, float* dst, int D, float mul) {
  for (int d = 0; d < D; ++d) dst[d] = S::load(src + d) * mul;
}

// ----------------------------------------------------------------------------------- forward

template <typename S>
void fwd_impl(const typename S::T* q, const typename S::T* k, const typename S::T* v, typename S::T* out,
              float* lse, const uint8_t* pad, const uint8_t* known_mask, int64_t B, int64_t H, int64_t L,
              int D, Strides sq, Strides sk, Strides sv, float scale, int nthreads) {
  using T = typename S::T;
  const CellLists cl(pad, known_mask, B, L);
  const int Dp = round_up(D, 16);

  // Tasks (b, h, query block) in order, so consecutive tasks share a cell's keys in cache.
  std::vector<int64_t> task_off(B * H + 1, 0);
  for (int64_t bh = 0; bh < B * H; ++bh)
    task_off[bh + 1] = task_off[bh] + (cl.nvalid(bh / H) + kBq - 1) / kBq;
  const int64_t ntasks = task_off[B * H];

#pragma omp parallel num_threads(nthreads)
  {
    // Padded query rows: zero output, lse = -inf (they attend nothing). Rows disjoint from the tasks'
    // below: no barrier between the two loops.
#pragma omp for schedule(static) nowait
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H;
      for (int64_t i = 0; pad != nullptr && i < L; ++i) {
        if (pad[b * L + i] == 0) continue;
        T* o = out + (bh * L + i) * D;
        for (int d = 0; d < D; ++d) S::store(o + d, 0.f);
        lse[bh * L + i] = kNegInf;
      }
    }

    // The known keys of the thread's current (b, h), packed once and reused by every query block
    // the thread takes from that (b, h): K^T as Dp x 64 tiles (the B operand of S = Q K^T) and V as
    // rows. Repacking per query block would redo a strided transpose of every key tile per 64 queries.
    int max_nk = 0;
    for (int64_t b = 0; b < B; ++b) max_nk = std::max(max_nk, cl.nknown(b));
    const int Lk = round_up(std::max(max_nk, 1), kBk);
    Buf Kall((size_t)Lk * Dp), Vall((size_t)Lk * Dp);
    int64_t packed_bh = -1;
    // lt holds each row's running sum as 16 lanes, reduced once at the end of the row.
    Buf Qt(kBq * Dp), St(kBq * kBk), Ot(kBq * Dp), mt(kBq), lt(kBq * kVec), tmp(2 * Dp);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t bh = std::upper_bound(task_off.begin(), task_off.end(), t) - task_off.begin() - 1;
      const int64_t b = bh / H, h = bh % H;
      const int qb = (int)(t - task_off[bh]);
      const int* vidx = cl.valid.data() + cl.valid_off[b] + qb * kBq;
      const int nq = std::min(kBq, cl.nvalid(b) - qb * kBq);
      const int Mq = round_up(nq, kR);
      const int* kidx = cl.known.data() + cl.known_off[b];
      const int nk = cl.nknown(b);
      const T* qbase = q + b * sq.b + h * sq.h;
      const T* kbase = k + b * sk.b + h * sk.h;
      const T* vbase = v + b * sv.b + h * sv.h;

      if (packed_bh != bh) {
        for (int j = 0; j < nk; ++j) {
          const T* kr = kbase + kidx[j] * sk.l;
          float* kt = Kall.p + (size_t)(j / kBk) * Dp * kBk + (j % kBk);
          for (int d = 0; d < D; ++d) kt[d * kBk] = S::load(kr + d);
          load_row<S>(vbase + kidx[j] * sv.l, Vall.p + (size_t)j * Dp, D, 1.f);
        }
        packed_bh = bh;
      }

      // Q pre-multiplied by the scale, so S holds the scaled scores.
      for (int r = 0; r < nq; ++r) load_row<S>(qbase + vidx[r] * sq.l, Qt.p + r * Dp, D, scale);
      for (int r = nq; r < Mq; ++r) std::fill(Qt.p + r * Dp, Qt.p + (r + 1) * Dp, 0.f);
      std::fill(mt.p, mt.p + kBq, kNegInf);
      std::fill(lt.p, lt.p + kBq * kVec, 0.f);
      std::fill(Ot.p, Ot.p + kBq * Dp, 0.f);

      for (int k0 = 0; k0 < nk; k0 += kBk) {
        const int nkb = std::min(kBk, nk - k0);
        const float* Kt = Kall.p + (size_t)k0 * Dp;  // tile k0 / kBk of Dp x kBk
        const float* Vt = Vall.p + (size_t)k0 * Dp;
        gemm<false>(Mq, kBk, D, Qt.p, Dp, Kt, kBk, St.p, kBk, false);
        // Online softmax: running max m and sum l per row; O is rescaled when the max grows.
        for (int r = 0; r < nq; ++r) {
          float* s = St.p + r * kBk;
          for (int j = nkb; j < kBk; ++j) s[j] = kNegInf;
          v16f mx = *(v16f*)s;
          for (int c = 16; c < kBk; c += 16) mx = vmax(mx, *(v16f*)(s + c));
          const float m_old = mt.p[r];
          const float m_new = std::max(m_old, hmax_tree(mx));
          const float alpha = m_old == kNegInf ? 0.f : std::exp(m_old - m_new);
          v16f sum = vbroadcast(0.f);
          const v16f mv = vbroadcast(m_new);
          for (int c = 0; c < kBk; c += 16) {
            const v16f p = exp_nonpos(*(v16f*)(s + c) - mv);
            *(v16f*)(s + c) = p;
            sum += p;
          }
          *(v16f*)(lt.p + r * kVec) = *(v16f*)(lt.p + r * kVec) * alpha + sum;
          mt.p[r] = m_new;
          if (k0 > 0) {
            float* o = Ot.p + r * Dp;
            const v16f av = vbroadcast(alpha);
            for (int c = 0; c < Dp; c += 16) *(v16f*)(o + c) *= av;
          }
        }
        gemm<false>(Mq, Dp, nkb, St.p, kBk, Vt, Dp, Ot.p, Dp, k0 > 0);
      }

      // Finish each row; unknown queries fold in their self term s_ii first.
      float* kself = tmp.p;
      float* vself = tmp.p + Dp;
      for (int r = 0; r < nq; ++r) {
        const int i = vidx[r];
        const float* o = Ot.p + r * Dp;
        T* dst = out + ((bh * L) + i) * D;
        const float m = mt.p[r], l = hsum_tree(*(v16f*)(lt.p + r * kVec));
        if (cl.unknown[b * L + i]) {
          load_row<S>(kbase + i * sk.l, kself, D, 1.f);
          load_row<S>(vbase + i * sv.l, vself, D, 1.f);
          const float sii = dot(Qt.p + r * Dp, kself, D);
          const float M = std::max(m, sii);
          const float a = m == kNegInf ? 0.f : std::exp(m - M);
          const float e = std::exp(sii - M);
          const float denom = a * l + e;
          const float inv = 1.f / denom;
          for (int d = 0; d < D; ++d) S::store(dst + d, (a * o[d] + e * vself[d]) * inv);
          lse[bh * L + i] = M + std::log(denom);
        } else {
          const float inv = 1.f / l;
          for (int d = 0; d < D; ++d) S::store(dst + d, o[d] * inv);
          lse[bh * L + i] = m + std::log(l);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------- backward

template <typename S>
void bwd_impl(const typename S::T* q, const typename S::T* k, const typename S::T* v, const typename S::T* o,
              const typename S::T* dout, const float* lse, float* dq, float* dk, float* dv, const uint8_t* pad,
              const uint8_t* known_mask, int64_t B, int64_t H, int64_t L, int D, Strides sq, Strides sk,
              Strides sv, Strides so, Strides sd, float scale, int nthreads) {
  using T = typename S::T;
  const CellLists cl(pad, known_mask, B, L);
  const int Dp = round_up(D, 16);
  int max_nv = 0;
  for (int64_t b = 0; b < B; ++b) max_nv = std::max(max_nv, cl.nvalid(b));
  const int Lp = round_up(std::max(max_nv, 1), kBq);

#pragma omp parallel num_threads(nthreads)
  {
    // Per thread: the whole (b, h) slice of scaled Q, dO and the dQ accumulator, gathered once in
    // fp32 (O(L Dp) each), plus one key block's K^T, K, V^T and its dK, dV accumulators.
    Buf Qg(Lp * Dp), dOg(Lp * Dp), dQg(Lp * Dp), lse_g(Lp), delta_g(Lp);
    Buf Kt(Dp * kBk), Kr(kBk * Dp), Vt(Dp * kBk), dKt(kBk * Dp), dVt(kBk * Dp), Pt(kBq * kBk), dPt(kBq * kBk),
        tmp(3 * Dp);

    // One thread owns each (b, h): dQ accumulates without atomics, in a fixed order (deterministic).
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* dqs = dq + bh * L * D;
      float* dks = dk + bh * L * D;
      float* dvs = dv + bh * L * D;
      std::fill(dqs, dqs + L * D, 0.f);
      std::fill(dks, dks + L * D, 0.f);
      std::fill(dvs, dvs + L * D, 0.f);
      const int nv = cl.nvalid(b), nk = cl.nknown(b);
      if (nv == 0) continue;
      const int* vidx = cl.valid.data() + cl.valid_off[b];
      const int* kidx = cl.known.data() + cl.known_off[b];
      const T* qbase = q + b * sq.b + h * sq.h;
      const T* kbase = k + b * sk.b + h * sk.h;
      const T* vbase = v + b * sv.b + h * sv.h;
      const T* obase = o + b * so.b + h * so.h;
      const T* dbase = dout + b * sd.b + h * sd.h;
      const float* lse_bh = lse + bh * L;

      float* orow = tmp.p;
      for (int r = 0; r < nv; ++r) {
        const int i = vidx[r];
        load_row<S>(qbase + i * sq.l, Qg.p + (size_t)r * Dp, D, scale);
        load_row<S>(dbase + i * sd.l, dOg.p + (size_t)r * Dp, D, 1.f);
        load_row<S>(obase + i * so.l, orow, D, 1.f);
        delta_g.p[r] = dot(dOg.p + (size_t)r * Dp, orow, D);  // Delta_i = dO_i . O_i
        lse_g.p[r] = lse_bh[i];
      }
      const int nvp = round_up(nv, kBq);
      std::fill(Qg.p + (size_t)nv * Dp, Qg.p + (size_t)nvp * Dp, 0.f);
      std::fill(dOg.p + (size_t)nv * Dp, dOg.p + (size_t)nvp * Dp, 0.f);
      std::fill(dQg.p, dQg.p + (size_t)nvp * Dp, 0.f);

      for (int k0 = 0; k0 < nk; k0 += kBk) {
        const int nkb = std::min(kBk, nk - k0);
        const int Mk = round_up(nkb, kR);
        for (int j = 0; j < nkb; ++j) {
          const T* kr = kbase + kidx[k0 + j] * sk.l;
          const T* vr = vbase + kidx[k0 + j] * sv.l;
          for (int d = 0; d < D; ++d) {
            const float kx = S::load(kr + d), vx = S::load(vr + d);
            Kt.p[d * kBk + j] = kx;
            Kr.p[j * Dp + d] = kx;
            Vt.p[d * kBk + j] = vx;
          }
        }
        for (int j = nkb; j < Mk; ++j) std::fill(Kr.p + j * Dp, Kr.p + (j + 1) * Dp, 0.f);
        std::fill(dKt.p, dKt.p + kBk * Dp, 0.f);
        std::fill(dVt.p, dVt.p + kBk * Dp, 0.f);

        for (int q0 = 0; q0 < nv; q0 += kBq) {
          const int nq = std::min(kBq, nv - q0);
          const int Mq = round_up(nq, kR);
          const float* Qb = Qg.p + (size_t)q0 * Dp;
          const float* dOb = dOg.p + (size_t)q0 * Dp;
          gemm<false>(Mq, kBk, D, Qb, Dp, Kt.p, kBk, Pt.p, kBk, false);   // S = (scale Q) K^T
          gemm<false>(Mq, kBk, D, dOb, Dp, Vt.p, kBk, dPt.p, kBk, false);  // dP = dO V^T
          for (int r = 0; r < nq; ++r) {
            float* p = Pt.p + r * kBk;
            float* dp = dPt.p + r * kBk;
            const v16f lv = vbroadcast(lse_g.p[q0 + r]);
            const v16f dl = vbroadcast(delta_g.p[q0 + r]);
            for (int j = nkb; j < kBk; ++j) p[j] = kNegInf;
            for (int c = 0; c < kBk; c += 16) {
              const v16f pv = exp_nonpos(*(v16f*)(p + c) - lv);  // P = exp(S - lse)
              *(v16f*)(p + c) = pv;
              *(v16f*)(dp + c) = pv * (*(v16f*)(dp + c) - dl);  // dS = P (dP - Delta)
            }
          }
          // Rows nq..Mq of P / dS are never read: the transposed products stop at K = nq.
          gemm<true>(Mk, Dp, nq, Pt.p, kBk, dOb, Dp, dVt.p, Dp, true);             // dV += P^T dO
          gemm<true>(Mk, Dp, nq, dPt.p, kBk, Qb, Dp, dKt.p, Dp, true);             // dK += dS^T (scale Q)
          gemm<false>(Mq, Dp, nkb, dPt.p, kBk, Kr.p, Dp, dQg.p + (size_t)q0 * Dp, Dp, true);  // dQ += dS K
        }
        for (int j = 0; j < nkb; ++j) {
          const int i = kidx[k0 + j];
          std::copy(dKt.p + j * Dp, dKt.p + j * Dp + D, dks + (int64_t)i * D);
          std::copy(dVt.p + j * Dp, dVt.p + j * Dp + D, dvs + (int64_t)i * D);
        }
      }

      // Self terms of unknown queries: the only entries of dK, dV for unknown keys.
      float* kself = tmp.p;
      float* vself = tmp.p + Dp;
      for (int r = 0; r < nv; ++r) {
        const int i = vidx[r];
        if (!cl.unknown[b * L + i]) continue;
        load_row<S>(kbase + i * sk.l, kself, D, 1.f);
        load_row<S>(vbase + i * sv.l, vself, D, 1.f);
        const float* qs = Qg.p + (size_t)r * Dp;
        const float* g = dOg.p + (size_t)r * Dp;
        const float p = std::exp(dot(qs, kself, D) - lse_g.p[r]);
        const float ds = p * (dot(g, vself, D) - delta_g.p[r]);
        float* dqr = dQg.p + (size_t)r * Dp;
        float* dkr = dks + (int64_t)i * D;
        float* dvr = dvs + (int64_t)i * D;
        for (int d = 0; d < D; ++d) {
          dqr[d] += ds * kself[d];
          dkr[d] = ds * qs[d];
          dvr[d] = p * g[d];
        }
      }
      for (int r = 0; r < nv; ++r) {
        const float* src = dQg.p + (size_t)r * Dp;
        float* dst = dqs + (int64_t)vidx[r] * D;
        for (int d = 0; d < D; ++d) dst[d] = scale * src[d];
      }
    }
  }
}

template <typename Tp>
const Tp* cptr(uintptr_t p) { return reinterpret_cast<const Tp*>(p); }

// dispatch_float_types needs a functor with a templated call operator (C++17: no template lambdas).
struct FwdCall {
  uintptr_t q, k, v, out, lse, pad, known;
  int64_t B, H, L, D;
  Strides sq, sk, sv;
  float scale;
  int nthreads;
  template <typename S>
  void operator()() const {
    using T = typename S::T;
    fwd_impl<S>(cptr<T>(q), cptr<T>(k), cptr<T>(v), reinterpret_cast<T*>(out), reinterpret_cast<float*>(lse),
                cptr<uint8_t>(pad), cptr<uint8_t>(known), B, H, L, (int)D, sq, sk, sv, scale, nthreads);
  }
};

struct BwdCall {
  uintptr_t q, k, v, o, dout, lse, dq, dk, dv, pad, known;
  int64_t B, H, L, D;
  Strides sq, sk, sv, so, sd;
  float scale;
  int nthreads;
  template <typename S>
  void operator()() const {
    using T = typename S::T;
    bwd_impl<S>(cptr<T>(q), cptr<T>(k), cptr<T>(v), cptr<T>(o), cptr<T>(dout), cptr<float>(lse),
                reinterpret_cast<float*>(dq), reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv),
                cptr<uint8_t>(pad), cptr<uint8_t>(known), B, H, L, (int)D, sq, sk, sv, so, sd, scale, nthreads);
  }
};

}  // namespace

void masked_attention_fwd_cpu(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                              uintptr_t pad, uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D,
                              int64_t sqb, int64_t sqh, int64_t sql, int64_t skb, int64_t skh, int64_t skl,
                              int64_t svb, int64_t svh, int64_t svl, double scale, int nthreads) {
  nthreads = threads_for(nthreads, 4.0 * B * H * L * L * D, kGrainFlops);  // QK^T and PV, at most
  FwdCall c{q, k, v, out, lse, pad, known, B, H, L, D, {sqb, sqh, sql}, {skb, skh, skl}, {svb, svh, svl},
            (float)scale, nthreads};
  dispatch_float_types(dtype, "masked_gene_attention", c);
}

void masked_attention_bwd_cpu(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t dout,
                              uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad,
                              uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sqb,
                              int64_t sqh, int64_t sql, int64_t skb, int64_t skh, int64_t skl, int64_t svb,
                              int64_t svh, int64_t svl, int64_t sob, int64_t soh, int64_t sol, int64_t sdb,
                              int64_t sdh, int64_t sdl, double scale, int nthreads) {
  nthreads = threads_for(nthreads, 10.0 * B * H * L * L * D, kGrainFlops);  // five L x L x D products
  BwdCall c{q, k, v, o, dout, lse, dq, dk, dv, pad, known, B, H, L, D, {sqb, sqh, sql}, {skb, skh, skl},
            {svb, svh, svl}, {sob, soh, sol}, {sdb, sdh, sdl}, (float)scale, nthreads};
  dispatch_float_types(dtype, "masked_gene_attention", c);
}

}  // namespace BIOGEN_CPU_NS
