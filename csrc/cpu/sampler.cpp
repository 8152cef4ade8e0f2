// Fused diffusion sampler step (SPEC 1.3): guidance, x0 from the prediction type, clipping or
// Imagen dynamic thresholding, eps (the network's, or re-derived from the clipped x0) and the linear
// update, in one pass over the tensors. Dynamic thresholding needs a per-sample quantile of |x0| first, so it runs in two phases
// with x0 kept in a float32 scratch buffer (no extra rounding of x0 for fp16/bf16 inputs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "biogen/common.h"
#include "biogen/parallel.h"

namespace BIOGEN_CPU_NS {
using namespace biogen;

namespace {

struct Coefs {
  float a, s, cs, cx0, ceps, cn, cpx;
};

inline float load_c(const float* p, int64_t b) { return p ? p[b] : 0.f; }

struct Args {
  const void *x, *m, *mu, *px0, *noise;
  void *prev, *x0;
  const float *alpha, *sigma, *c_sample, *c_x0, *c_eps, *c_noise, *c_prev_x0;
  int64_t B, N;
  int pred;
  float w, clip, ratio, max_value;
  bool clipped_eps;  // eps from the clipped x0 (diffusers' use_clipped_model_output) or the network's
};

template <class S>
inline float guided_m(const Args& A, int64_t i) {
  using T = typename S::T;
  float m = S::load((const T*)A.m + i);
  if (A.mu) {
    const float u = S::load((const T*)A.mu + i);
    m = u + A.w * (m - u);
  }
  return m;
}

inline float x0_of(const Args& A, const Coefs& k, float m, float xv) {
  if (A.pred == 0) return (xv - k.s * m) / k.a;
  if (A.pred == 1) return m;
  return k.a * xv - k.s * m;
}

// The eps the network's output implies before any clipping (diffusers' DDIM pred_epsilon).
inline float net_eps(const Args& A, const Coefs& k, float m, float xv) {
  if (A.pred == 0) return m;
  if (A.pred == 1) return (xv - k.a * m) / k.s;
  return k.a * m + k.s * xv;
}

template <class S>
inline void finish(const Args& A, const Coefs& k, int64_t i, float xv, float x0, float eps) {
  using T = typename S::T;
  float out = k.cs * xv + k.cx0 * x0;
  if (A.c_eps) out += k.ceps * (A.clipped_eps ? (xv - k.a * x0) / k.s : eps);
  if (A.px0) out += k.cpx * S::load((const T*)A.px0 + i);
  if (A.noise) out += k.cn * S::load((const T*)A.noise + i);
  S::store((T*)A.prev + i, out);
  S::store((T*)A.x0 + i, x0);
}

inline Coefs coefs(const Args& A, int64_t b) {
  return Coefs{A.alpha[b], A.sigma[b], A.c_sample[b], A.c_x0[b], load_c(A.c_eps, b), load_c(A.c_noise, b),
               load_c(A.c_prev_x0, b)};
}

// torch.quantile's 'linear' interpolation of sorted |v| at q (v is reordered).
float quantile_abs(float* v, int64_t n, float q) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::fabs(v[i]);
  const double pos = double(q) * double(n - 1);
  const int64_t lo = int64_t(std::floor(pos)), hi = std::min<int64_t>(lo + 1, n - 1);
  std::nth_element(v, v + lo, v + n);
  const float vlo = v[lo];
  float vhi = vlo;
  if (hi != lo) vhi = *std::min_element(v + lo + 1, v + n);  // the next order statistic
  return vlo + float(pos - double(lo)) * (vhi - vlo);
}

template <class S>
void run(const Args& A, int nthreads) {
  using T = typename S::T;
  const int64_t B = A.B, N = A.N;
  // Enough tasks for load balance when B is small; each task a contiguous slice of one sample.
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(N, (4 * int64_t(nthreads) + B - 1) / B));
  const int64_t chunk = (N + per - 1) / per;
  if (A.ratio <= 0.f) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < B * per; ++task) {
      const int64_t b = task / per;
      const Coefs k = coefs(A, b);
      const int64_t i0 = b * N + (task % per) * chunk, i1 = std::min(b * N + N, i0 + chunk);
      for (int64_t i = i0; i < i1; ++i) {
        const float xv = S::load((const T*)A.x + i), m = guided_m<S>(A, i);
        float x0 = x0_of(A, k, m, xv);
        if (A.clip > 0.f) x0 = std::min(std::max(x0, -A.clip), A.clip);
        finish<S>(A, k, i, xv, x0, net_eps(A, k, m, xv));
      }
    }
    return;
  }
  std::vector<float> x0f(static_cast<size_t>(B * N)), scratch(static_cast<size_t>(B * N)), th(static_cast<size_t>(B));
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * per; ++task) {
      const int64_t b = task / per;
      const Coefs k = coefs(A, b);
      const int64_t i0 = b * N + (task % per) * chunk, i1 = std::min(b * N + N, i0 + chunk);
      for (int64_t i = i0; i < i1; ++i)
        x0f[i] = scratch[i] = x0_of(A, k, guided_m<S>(A, i), S::load((const T*)A.x + i));
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      th[b] = std::min(std::max(quantile_abs(&scratch[b * N], N, A.ratio), 1.f), A.max_value);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * per; ++task) {
      const int64_t b = task / per;
      const Coefs k = coefs(A, b);
      const float s = th[b];
      const int64_t i0 = b * N + (task % per) * chunk, i1 = std::min(b * N + N, i0 + chunk);
      const bool need_eps = A.c_eps && !A.clipped_eps;
      for (int64_t i = i0; i < i1; ++i) {
        const float xv = S::load((const T*)A.x + i);
        const float x0 = std::min(std::max(x0f[i], -s), s) / s;
        finish<S>(A, k, i, xv, x0, need_eps ? net_eps(A, k, guided_m<S>(A, i), xv) : 0.f);
      }
    }
  }
}

}  // namespace

void sampler_step(int dtype, uintptr_t x, uintptr_t m, uintptr_t mu, uintptr_t px0, uintptr_t noise, uintptr_t prev,
                  uintptr_t x0, uintptr_t alpha, uintptr_t sigma, uintptr_t c_sample, uintptr_t c_x0, uintptr_t c_eps,
                  uintptr_t c_noise, uintptr_t c_prev_x0, int64_t B, int64_t N, int pred, double w, double clip,
                  double ratio, double max_value, int clipped_eps, int nthreads) {
  BIOGEN_CHECK(B > 0 && N > 0, "sampler_step: empty input");
  nthreads = threads_for(nthreads, 4.0 * B * N, kGrainElements);  // reads x and the model outputs
  BIOGEN_CHECK(pred >= 0 && pred <= 2, "sampler_step: unknown prediction type");
  BIOGEN_CHECK((px0 == 0) == (c_prev_x0 == 0), "sampler_step: prev_x0 and c_prev_x0 go together");
  BIOGEN_CHECK((noise == 0) == (c_noise == 0), "sampler_step: noise and c_noise go together");
  const Args A{(const void*)x, (const void*)m, (const void*)mu, (const void*)px0, (const void*)noise, (void*)prev,
               (void*)x0, (const float*)alpha, (const float*)sigma, (const float*)c_sample, (const float*)c_x0,
               (const float*)c_eps, (const float*)c_noise, (const float*)c_prev_x0, B, N, pred, float(w),
               float(clip), float(ratio), float(max_value), clipped_eps != 0};
  dispatch_float_types(dtype, "sampler_step", [&]<class St>() { run<St>(A, nthreads); });
}

}  // namespace BIOGEN_CPU_NS
