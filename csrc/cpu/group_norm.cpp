// Fused GroupNorm + affine + FiLM + SiLU (SPEC 1.3), forward and backward, NCHW and channels-last.
//
// Statistics: per (batch, channel) sums of (x - K) and (x - K)^2 with K the channel's first value
// (the shift keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std), float lanes flushed to
// double every few thousand elements, combined per group in double. The affine, FiLM and the
// normalisation fold into one per-(batch, channel) multiply-add, so the apply pass is y = act(x A + B).
//
// NCHW: one task per (batch, group) does stats then apply on the same block while it is in cache.
// Channels-last: a channel's values are strided, so tasks are (batch, spatial chunk) with
// per-channel partial sums, reduced in a fixed order (deterministic for any thread count).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "biogen/common.h"
#include "biogen/parallel.h"
#include "biogen/vec.h"

namespace BIOGEN_CPU_NS {
using namespace biogen;

namespace {

constexpr int64_t kFlush = 2048;  // float accumulation before flushing to double

template <class S>
inline v16f ld(const typename S::T* p) {
  if constexpr (std::is_same_v<S, F32>) {
    return vload(p);
  } else {
    v16f v;
    for (int i = 0; i < kVec; ++i) v[i] = S::load(p + i);
    return v;
  }
}

template <class S>
inline void st(typename S::T* p, v16f v) {
  if constexpr (std::is_same_v<S, F32>) {
    vstore(p, v);
  } else {
    for (int i = 0; i < kVec; ++i) S::store(p + i, v[i]);
  }
}

// sigmoid(z) = 1 / (1 + e^-z): the SiLU was 2/3 of the forward's time with 1 / (1 + vexp(-z)). Leaner:
// e^-z = 2^-m e^r with m = round(z log2 e), r = m ln2 - z in [-ln2/2, ln2/2]; z is clamped to +-87 so
// 2^-m stays a normal float and no under/overflow or NaN selects are needed (outside the clamp the
// sigmoid is 1 or below 2e-38, so z * sigmoid is still right to float resolution; a NaN z gives a
// finite sigmoid but z * sigmoid stays NaN). vrcp instead of a division; under AVX-512 a 16-entry
// table and a cubic, elsewhere a degree-5 polynomial fitted on that interval (relative error 1.6e-7)
// instead of degree 6. The SiLU's relative error is below 5e-7 over the whole float range (tested
// per ISA build).
inline v16f vsigmoid(v16f z) {
  const v16f zc = vmin(vmax(z, vbroadcast(-87.f)), vbroadcast(87.f));
  const v16f magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
#if defined(__AVX512F__)
  // Finer reduction, two fewer multiply-adds: m = round(16 z log2 e) = 16 q + j, e^-z = 2^-q 2^(-j/16)
  // e^r with |r| <= ln2/32, 2^(-j/16) from a 16-entry table held in one register (vpermps takes the
  // low 4 bits of t's bits, which are j), e^r to 9e-9 by its cubic Taylor polynomial.
  const v16f table = {1.0f,        0.957603276f, 0.917004049f, 0.878126085f, 0.840896428f, 0.805245161f,
                      0.771105409f, 0.738413095f, 0.707106769f, 0.677127779f, 0.648419797f, 0.620928884f,
                      0.594603539f, 0.56939429f,  0.545253873f, 0.522136867f};
  const v16f t = zc * 23.0831203f + magic;
  const v16f m = t - magic;
  const v16f r = m * 0.0433216989f - zc;
  v16f p = r * (1.f / 6) + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  v16i bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const v16f tj = (v16f)_mm512_permutexvar_ps((__m512i)bits, (__m512)table);
  // bits(t) = bits(magic) + m; (m & ~15) << 19 = q << 23 and bits(magic) << 19 vanishes mod 2^32
  v16i sbits;
  std::memcpy(&sbits, &tj, sizeof(sbits));
  sbits -= (bits & ~15) << 19;  // 2^(-j/16) 2^-q: q off the exponent field
  v16f scale;
  std::memcpy(&scale, &sbits, sizeof(scale));
  return vrcp(p * scale + 1.f);
#else
  const v16f t = zc * 1.44269504088896341f + magic;
  const v16f m = t - magic;
#if defined(__FMA__)
  // one rounding in the fused multiply-subtract; ln2's float error, 2e-9, times |m| <= 126 adds up to
  // 2.4e-7 relative to e^-z (2e-8 for |z| < 10)
  const v16f r = m * 0.693147182f - zc;
#else
  // without FMA m * ln2 would be rounded first: ln2 split in two so m * ln2_hi is exact
  v16f r = m * 0.693359375f - zc;
  r = m * -2.12194440e-4f + r;
#endif
  v16f p = vbroadcast(8.31252709e-3f);
  p = p * r + 4.18901183e-2f;
  p = p * r + 1.66671142e-1f;
  p = p * r + 4.99992311e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  v16i bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = ((0x4B400000 + 127) - bits) << 23;  // 127 - m in the exponent field: 2^-m
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return vrcp(p * scale + 1.f);
#endif
}
inline float ssigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

template <int ACT>
inline v16f vact(v16f z) {
  if constexpr (ACT == 1) return z * vsigmoid(z);
  return z;
}
template <int ACT>
inline float sact(float z) {
  if constexpr (ACT == 1) return z * ssigmoid(z);
  return z;
}
// d act / dz
template <int ACT>
inline v16f vdact(v16f z) {
  if constexpr (ACT == 1) {
    const v16f s = vsigmoid(z);
    return s * (1.f + z * (1.f - s));
  }
  return vbroadcast(1.f);
}
template <int ACT>
inline float sdact(float z) {
  if constexpr (ACT == 1) {
    const float s = ssigmoid(z);
    return s * (1.f + z * (1.f - s));
  }
  return 1.f;
}

struct Params {
  const float *w, *b, *scale, *shift;
  int64_t B, C, S, G, cpg;
  float f(int64_t bc) const { return scale ? 1.f + scale[bc] : 1.f; }
  float t(int64_t bc) const { return shift ? shift[bc] : 0.f; }
};

// Group mean / rstd from per-channel shifted sums (each channel has S values).
inline void group_moments(const double* s1, const double* s2, const float* K, int64_t cpg, int64_t S,
                          double eps, float* mean_out, float* rstd_out) {
  const double N = double(cpg) * double(S);
  double tot = 0;
  for (int64_t c = 0; c < cpg; ++c) tot += double(K[c]) * double(S) + s1[c];
  const double m = tot / N;
  double M2 = 0;
  for (int64_t c = 0; c < cpg; ++c) {
    const double d = m - double(K[c]);
    M2 += s2[c] - 2.0 * d * s1[c] + double(S) * d * d;
  }
  const double var = std::max(M2 / N, 0.0);
  *mean_out = float(m);
  *rstd_out = float(1.0 / std::sqrt(var + eps));
}

// y = act(x A + B) folded coefficients of channel c in batch b.
inline void fold(const Params& p, int64_t b, int64_t c, float mean, float rstd, float* A, float* Bc) {
  const int64_t bc = b * p.C + c;
  const float f = p.f(bc), ws = rstd * p.w[c];
  *A = ws * f;
  *Bc = (p.b[c] - mean * ws) * f + p.t(bc);
}

template <class S>
void row_moments(const typename S::T* x, int64_t n, float K, double* s1, double* s2) {
  double d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kFlush) {
    const int64_t i1 = std::min(n, i0 + kFlush);
    v16f a1 = {}, a2 = {}, b1 = {}, b2 = {};
    int64_t i = i0;
    for (; i + 2 * kVec <= i1; i += 2 * kVec) {
      const v16f u = ld<S>(x + i) - K, v = ld<S>(x + i + kVec) - K;
      a1 += u; a2 += u * u; b1 += v; b2 += v * v;
    }
    for (; i + kVec <= i1; i += kVec) {
      const v16f u = ld<S>(x + i) - K;
      a1 += u; a2 += u * u;
    }
    float t1 = vsum(a1 + b1), t2 = vsum(a2 + b2);
    for (; i < i1; ++i) {
      const float u = S::load(x + i) - K;
      t1 += u; t2 += u * u;
    }
    d1 += t1; d2 += t2;
  }
  *s1 = d1; *s2 = d2;
}

template <class S, int ACT>
void apply_row(const typename S::T* x, typename S::T* y, int64_t n, float A, float Bc) {
  const v16f va = vbroadcast(A), vb = vbroadcast(Bc);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) st<S>(y + i, vact<ACT>(ld<S>(x + i) * va + vb));
  for (; i < n; ++i) S::store(y + i, sact<ACT>(S::load(x + i) * A + Bc));
}

// ------------------------------------------------------------------------------------- forward

template <class S, int ACT>
void fwd_nchw(const typename S::T* x, typename S::T* y, float* mean, float* rstd, const Params& p, double eps,
              int nthreads) {
  const int64_t S_ = p.S, cpg = p.cpg;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> s1(cpg), s2(cpg);
    std::vector<float> K(cpg);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < p.B * p.G; ++bg) {
      const int64_t b = bg / p.G, g = bg % p.G;
      const int64_t off = (b * p.C + g * cpg) * S_;
      for (int64_t c = 0; c < cpg; ++c) {
        K[c] = S::load(x + off + c * S_);
        row_moments<S>(x + off + c * S_, S_, K[c], &s1[c], &s2[c]);
      }
      group_moments(s1.data(), s2.data(), K.data(), cpg, S_, eps, mean + bg, rstd + bg);
      for (int64_t c = 0; c < cpg; ++c) {
        float A, Bc;
        fold(p, b, g * cpg + c, mean[bg], rstd[bg], &A, &Bc);
        apply_row<S, ACT>(x + off + c * S_, y + off + c * S_, S_, A, Bc);
      }
    }
  }
}

// Channels-last position chunks per image: about kClTasks tasks in all. The count follows the shape,
// not the thread count, so the per-chunk partial sums (added in chunk order) and the result are the
// same for any number of threads.
constexpr int64_t kClTasks = 64;
inline int64_t cl_chunks(int64_t B, int64_t S) {
  return std::max<int64_t>(1, std::min<int64_t>(S, (kClTasks + B - 1) / B));
}

// Channels-last: per (b, chunk) per-channel partial sums of f1(x, dy) and f2(x, dy) over the chunk's
// positions; `body(row_x, row_dy, c0, acc1, acc2)` accumulates one position's channels.
template <class Body>
void cl_partial_sums(int64_t B, int64_t S, int64_t C, int64_t nchunk, int nthreads, std::vector<double>& p1,
                     std::vector<double>& p2, Body body) {
  const int64_t chunk = (S + nchunk - 1) / nchunk;
  p1.assign(size_t(B * nchunk * C), 0.0);
  p2.assign(size_t(B * nchunk * C), 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> a1(C), a2(C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * nchunk; ++task) {
      const int64_t b = task / nchunk, k = task % nchunk;
      const int64_t s0 = k * chunk, s1 = std::min(S, s0 + chunk);
      double* d1 = p1.data() + task * C;
      double* d2 = p2.data() + task * C;
      const int64_t block = std::max<int64_t>(1, kFlush / 8);
      for (int64_t sb = s0; sb < s1; sb += block) {
        std::fill(a1.begin(), a1.end(), 0.f);
        std::fill(a2.begin(), a2.end(), 0.f);
        for (int64_t s = sb; s < std::min(s1, sb + block); ++s) body(b, s, a1.data(), a2.data());
        for (int64_t c = 0; c < C; ++c) { d1[c] += a1[c]; d2[c] += a2[c]; }
      }
    }
  }
}

// Sum per-chunk partials in chunk order: out[b * C + c].
inline void cl_reduce(const std::vector<double>& p, int64_t B, int64_t nchunk, int64_t C, std::vector<double>& out) {
  out.assign(size_t(B * C), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < nchunk; ++k)
      for (int64_t c = 0; c < C; ++c) out[b * C + c] += p[(b * nchunk + k) * C + c];
}

// Elementwise over channels-last rows with per-(b, c) coefficient arrays; body(b, s) does one position.
template <class Body>
void cl_elementwise(int64_t B, int64_t S, int64_t nchunk, int nthreads, Body body) {
  const int64_t chunk = (S + nchunk - 1) / nchunk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t task = 0; task < B * nchunk; ++task) {
    const int64_t b = task / nchunk, k = task % nchunk;
    for (int64_t s = k * chunk; s < std::min(S, (k + 1) * chunk); ++s) body(b, s);
  }
}

template <class S, int ACT>
void fwd_cl(const typename S::T* x, typename S::T* y, float* mean, float* rstd, const Params& p, double eps,
            int nthreads) {
  using T = typename S::T;
  const int64_t B = p.B, C = p.C, S_ = p.S, cpg = p.cpg;
  const int64_t nchunk = cl_chunks(B, S_);
  std::vector<float> K(size_t(B * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) K[b * C + c] = S::load(x + b * S_ * C + c);
  std::vector<double> p1, p2, s1, s2;
  cl_partial_sums(B, S_, C, nchunk, nthreads, p1, p2, [&](int64_t b, int64_t s, float* a1, float* a2) {
    const T* row = x + (b * S_ + s) * C;
    const float* k = K.data() + b * C;
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) {
      const v16f u = ld<S>(row + c) - vload(k + c);
      vstore(a1 + c, vload(a1 + c) + u);
      vstore(a2 + c, vload(a2 + c) + u * u);
    }
    for (; c < C; ++c) {
      const float u = S::load(row + c) - k[c];
      a1[c] += u; a2[c] += u * u;
    }
  });
  cl_reduce(p1, B, nchunk, C, s1);
  cl_reduce(p2, B, nchunk, C, s2);
  std::vector<float> A(size_t(B * C)), Bc(size_t(B * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t o = b * C + g * cpg, bg = b * p.G + g;
      group_moments(&s1[o], &s2[o], &K[o], cpg, S_, eps, mean + bg, rstd + bg);
      for (int64_t c = 0; c < cpg; ++c) fold(p, b, g * cpg + c, mean[bg], rstd[bg], &A[o + c], &Bc[o + c]);
    }
  cl_elementwise(B, S_, nchunk, nthreads, [&](int64_t b, int64_t s) {
    const T* xr = x + (b * S_ + s) * C;
    T* yr = y + (b * S_ + s) * C;
    const float *a = A.data() + b * C, *bb = Bc.data() + b * C;
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) st<S>(yr + c, vact<ACT>(ld<S>(xr + c) * vload(a + c) + vload(bb + c)));
    for (; c < C; ++c) S::store(yr + c, sact<ACT>(S::load(xr + c) * a[c] + bb[c]));
  });
}

// ------------------------------------------------------------------------------------- backward
//
// dz = dy act'(z); per (b, c): sdz = sum dz, sdzx = sum dz xhat. Per group, with fw = (1 + scale) w:
// dx = rstd (fw dz - G1/N - xhat G2/N), G1 = sum_c fw sdz, G2 = sum_c fw sdzx, N = cpg S, which is
// dx = P_c dz + Q (x - mean) + R with P_c = rstd fw, Q = -rstd^2 G2/N, R = -rstd G1/N (keeping
// x - mean rather than folding mean into R avoids a cancellation when |mean| rstd is large).

struct BwdCoef {
  float P, Q, R, M;
};

inline void group_bwd_coefs(const Params& p, int64_t b, int64_t g, float mean, float rstd, const double* sdz,
                            const double* sdzx, BwdCoef* out) {
  double G1 = 0, G2 = 0;
  for (int64_t c = 0; c < p.cpg; ++c) {
    const int64_t ch = g * p.cpg + c;
    const double fw = double(p.f(b * p.C + ch)) * p.w[ch];
    G1 += fw * sdz[c];
    G2 += fw * sdzx[c];
  }
  const double N = double(p.cpg) * double(p.S), r = rstd;
  const float Q = float(-r * r * G2 / N), R = float(-r * G1 / N);
  for (int64_t c = 0; c < p.cpg; ++c) {
    const int64_t ch = g * p.cpg + c;
    out[c] = {float(r * p.f(b * p.C + ch) * p.w[ch]), Q, R, mean};
  }
}

template <class S, int ACT>
void bwd_row_sums(const typename S::T* x, const typename S::T* dy, int64_t n, float A, float Bc, float xr,
                  float xm, double* sdz, double* sdzx) {
  const v16f va = vbroadcast(A), vb = vbroadcast(Bc), vr = vbroadcast(xr), vm = vbroadcast(xm);
  double d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kFlush) {
    const int64_t i1 = std::min(n, i0 + kFlush);
    v16f a1 = {}, a2 = {};
    int64_t i = i0;
    for (; i + kVec <= i1; i += kVec) {
      const v16f xv = ld<S>(x + i);
      const v16f dz = ld<S>(dy + i) * vdact<ACT>(xv * va + vb);
      a1 += dz;
      a2 += dz * (xv * vr + vm);
    }
    float t1 = vsum(a1), t2 = vsum(a2);
    for (; i < i1; ++i) {
      const float xv = S::load(x + i), dz = S::load(dy + i) * sdact<ACT>(xv * A + Bc);
      t1 += dz; t2 += dz * (xv * xr + xm);
    }
    d1 += t1; d2 += t2;
  }
  *sdz = d1; *sdzx = d2;
}

// float32: pass 1 also leaves dz in dx, so pass 2 (on the block still in cache) skips the exp.
template <int ACT>
void bwd_row_sums_store(const float* x, const float* dy, float* dz_out, int64_t n, float A, float Bc, float xr,
                        float xm, double* sdz, double* sdzx) {
  const v16f va = vbroadcast(A), vb = vbroadcast(Bc), vr = vbroadcast(xr), vm = vbroadcast(xm);
  double d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kFlush) {
    const int64_t i1 = std::min(n, i0 + kFlush);
    v16f a1 = {}, a2 = {};
    int64_t i = i0;
    for (; i + kVec <= i1; i += kVec) {
      const v16f xv = vload(x + i);
      const v16f dz = vload(dy + i) * vdact<ACT>(xv * va + vb);
      vstore(dz_out + i, dz);
      a1 += dz;
      a2 += dz * (xv * vr + vm);
    }
    float t1 = vsum(a1), t2 = vsum(a2);
    for (; i < i1; ++i) {
      const float xv = x[i], dz = dy[i] * sdact<ACT>(xv * A + Bc);
      dz_out[i] = dz;
      t1 += dz; t2 += dz * (xv * xr + xm);
    }
    d1 += t1; d2 += t2;
  }
  *sdz = d1; *sdzx = d2;
}

inline void bwd_row_dx_from_dz(const float* x, float* dzdx, int64_t n, BwdCoef k) {
  const v16f vp = vbroadcast(k.P), vq = vbroadcast(k.Q), vr = vbroadcast(k.R), vm = vbroadcast(k.M);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) vstore(dzdx + i, vload(dzdx + i) * vp + (vload(x + i) - vm) * vq + vr);
  for (; i < n; ++i) dzdx[i] = dzdx[i] * k.P + (x[i] - k.M) * k.Q + k.R;
}

template <class S, int ACT>
void bwd_row_dx(const typename S::T* x, const typename S::T* dy, typename S::T* dx, int64_t n, float A, float Bc,
                BwdCoef k) {
  const v16f va = vbroadcast(A), vb = vbroadcast(Bc), vp = vbroadcast(k.P), vq = vbroadcast(k.Q),
             vr = vbroadcast(k.R), vm = vbroadcast(k.M);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const v16f xv = ld<S>(x + i);
    const v16f dz = ld<S>(dy + i) * vdact<ACT>(xv * va + vb);
    st<S>(dx + i, dz * vp + (xv - vm) * vq + vr);
  }
  for (; i < n; ++i) {
    const float xv = S::load(x + i), dz = S::load(dy + i) * sdact<ACT>(xv * A + Bc);
    S::store(dx + i, dz * k.P + (xv - k.M) * k.Q + k.R);
  }
}

template <class S, int ACT>
void bwd_nchw(const typename S::T* dy, const typename S::T* x, typename S::T* dx, const float* mean,
              const float* rstd, float* sum_dz, float* sum_dzx, const Params& p, int nthreads) {
  const int64_t S_ = p.S, cpg = p.cpg;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> sdz(cpg), sdzx(cpg);
    std::vector<float> A(cpg), Bc(cpg);
    std::vector<BwdCoef> k(cpg);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < p.B * p.G; ++bg) {
      const int64_t b = bg / p.G, g = bg % p.G;
      const int64_t off = (b * p.C + g * cpg) * S_;
      const float m = mean[bg], r = rstd[bg];
      for (int64_t c = 0; c < cpg; ++c) {
        fold(p, b, g * cpg + c, m, r, &A[c], &Bc[c]);
        if constexpr (std::is_same_v<S, F32>)
          bwd_row_sums_store<ACT>(x + off + c * S_, dy + off + c * S_, dx + off + c * S_, S_, A[c], Bc[c], r,
                                  -m * r, &sdz[c], &sdzx[c]);
        else
          bwd_row_sums<S, ACT>(x + off + c * S_, dy + off + c * S_, S_, A[c], Bc[c], r, -m * r, &sdz[c],
                               &sdzx[c]);
        sum_dz[b * p.C + g * cpg + c] = float(sdz[c]);
        sum_dzx[b * p.C + g * cpg + c] = float(sdzx[c]);
      }
      group_bwd_coefs(p, b, g, m, r, sdz.data(), sdzx.data(), k.data());
      for (int64_t c = 0; c < cpg; ++c) {
        if constexpr (std::is_same_v<S, F32>)
          bwd_row_dx_from_dz(x + off + c * S_, dx + off + c * S_, S_, k[c]);
        else
          bwd_row_dx<S, ACT>(x + off + c * S_, dy + off + c * S_, dx + off + c * S_, S_, A[c], Bc[c], k[c]);
      }
    }
  }
}

template <class S, int ACT>
void bwd_cl(const typename S::T* dy, const typename S::T* x, typename S::T* dx, const float* mean,
            const float* rstd, float* sum_dz, float* sum_dzx, const Params& p, int nthreads) {
  using T = typename S::T;
  const int64_t B = p.B, C = p.C, S_ = p.S, cpg = p.cpg;
  const int64_t nchunk = cl_chunks(B, S_);
  // Per (b, c): folded forward coefficients and xhat = x xr + xm.
  std::vector<float> A(size_t(B * C)), Bc(size_t(B * C)), XR(size_t(B * C)), XM(size_t(B * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bg = b * p.G + c / cpg, bc = b * C + c;
      fold(p, b, c, mean[bg], rstd[bg], &A[bc], &Bc[bc]);
      XR[bc] = rstd[bg];
      XM[bc] = -mean[bg] * rstd[bg];
    }
  std::vector<double> p1, p2, sdz, sdzx;
  cl_partial_sums(B, S_, C, nchunk, nthreads, p1, p2, [&](int64_t b, int64_t s, float* a1, float* a2) {
    const T *xr = x + (b * S_ + s) * C, *gr = dy + (b * S_ + s) * C;
    const int64_t o = b * C;
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) {
      const v16f xv = ld<S>(xr + c);
      const v16f dz = ld<S>(gr + c) * vdact<ACT>(xv * vload(&A[o + c]) + vload(&Bc[o + c]));
      vstore(a1 + c, vload(a1 + c) + dz);
      vstore(a2 + c, vload(a2 + c) + dz * (xv * vload(&XR[o + c]) + vload(&XM[o + c])));
    }
    for (; c < C; ++c) {
      const float xv = S::load(xr + c), dz = S::load(gr + c) * sdact<ACT>(xv * A[o + c] + Bc[o + c]);
      a1[c] += dz;
      a2[c] += dz * (xv * XR[o + c] + XM[o + c]);
    }
  });
  cl_reduce(p1, B, nchunk, C, sdz);
  cl_reduce(p2, B, nchunk, C, sdzx);
  std::vector<float> P(size_t(B * C)), Q(size_t(B * C)), R(size_t(B * C)), M(size_t(B * C));
  std::vector<BwdCoef> k(cpg);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t o = b * C + g * cpg, bg = b * p.G + g;
      group_bwd_coefs(p, b, g, mean[bg], rstd[bg], &sdz[o], &sdzx[o], k.data());
      for (int64_t c = 0; c < cpg; ++c) {
        P[o + c] = k[c].P; Q[o + c] = k[c].Q; R[o + c] = k[c].R; M[o + c] = k[c].M;
        sum_dz[o + c] = float(sdz[o + c]);
        sum_dzx[o + c] = float(sdzx[o + c]);
      }
    }
  cl_elementwise(B, S_, nchunk, nthreads, [&](int64_t b, int64_t s) {
    const T *xr = x + (b * S_ + s) * C, *gr = dy + (b * S_ + s) * C;
    T* dr = dx + (b * S_ + s) * C;
    const int64_t o = b * C;
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) {
      const v16f xv = ld<S>(xr + c);
      const v16f dz = ld<S>(gr + c) * vdact<ACT>(xv * vload(&A[o + c]) + vload(&Bc[o + c]));
      st<S>(dr + c, dz * vload(&P[o + c]) + (xv - vload(&M[o + c])) * vload(&Q[o + c]) + vload(&R[o + c]));
    }
    for (; c < C; ++c) {
      const float xv = S::load(xr + c), dz = S::load(gr + c) * sdact<ACT>(xv * A[o + c] + Bc[o + c]);
      S::store(dr + c, dz * P[o + c] + (xv - M[o + c]) * Q[o + c] + R[o + c]);
    }
  });
}

Params make_params(uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift, int64_t B, int64_t C, int64_t S,
                   int64_t G) {
  BIOGEN_CHECK(G > 0 && C % G == 0, "group_norm: channels must be divisible by num_groups");
  BIOGEN_CHECK(B > 0 && S > 0, "group_norm: empty input");
  return Params{(const float*)w, (const float*)b, (const float*)scale, (const float*)shift, B, C, S, G, C / G};
}

}  // namespace

void group_norm_fwd(int dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift, uintptr_t y,
                    uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last,
                    double eps, int act, int nthreads) {
  nthreads = threads_for(nthreads, 2.0 * B * C * S, kGrainElements);  // reads x twice
  const Params p = make_params(w, b, scale, shift, B, C, S, G);
  dispatch_float_types(dtype, "group_norm_silu", [&]<class St>() {
    using T = typename St::T;
    auto run = [&]<int ACT>() {
      if (channels_last)
        fwd_cl<St, ACT>((const T*)x, (T*)y, (float*)mean, (float*)rstd, p, eps, nthreads);
      else
        fwd_nchw<St, ACT>((const T*)x, (T*)y, (float*)mean, (float*)rstd, p, eps, nthreads);
    };
    if (act == 1) run.template operator()<1>(); else run.template operator()<0>();
  });
}

void group_norm_bwd(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale,
                    uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t sum_dz,
                    uintptr_t sum_dzx, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last, int act,
                    int nthreads) {
  nthreads = threads_for(nthreads, 3.0 * B * C * S, kGrainElements);  // reads x, dy and writes dx
  const Params p = make_params(w, b, scale, shift, B, C, S, G);
  dispatch_float_types(dtype, "group_norm_silu", [&]<class St>() {
    using T = typename St::T;
    auto run = [&]<int ACT>() {
      if (channels_last)
        bwd_cl<St, ACT>((const T*)dy, (const T*)x, (T*)dx, (const float*)mean, (const float*)rstd,
                        (float*)sum_dz, (float*)sum_dzx, p, nthreads);
      else
        bwd_nchw<St, ACT>((const T*)dy, (const T*)x, (T*)dx, (const float*)mean, (const float*)rstd,
                          (float*)sum_dz, (float*)sum_dzx, p, nthreads);
    };
    if (act == 1) run.template operator()<1>(); else run.template operator()<0>();
  });
}

}  // namespace BIOGEN_CPU_NS
