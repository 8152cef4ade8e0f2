// CUDA sampler_step (SPEC 1.3): one elementwise kernel, grid (blocks over the sample, batch).
// Dynamic thresholding runs as two launches around a per-sample quantile that the Python side
// computes with torch.quantile on the float32 x0 the first launch writes (mode 1), the second
// launch (mode 2) clamps, rescales and finishes the update. Mode 0 is the whole step in one read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "biogen/cuda_launch.cuh"

namespace biogen::cuda {
namespace {

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

struct Coefs {
  const float *alpha, *sigma, *c_sample, *c_x0, *c_eps, *c_noise, *c_prev_x0;
};

template <typename T>
__global__ void step_kernel(const T* x, const T* m, const T* mu, const T* px0, const T* noise, T* prev, T* x0_out,
                            float* x0f, const float* th, Coefs k, int64_t N, int pred, float w, float clip,
                            int mode, bool clipped_eps, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const int64_t i = b * N + j;
  const float a = k.alpha[b], s = k.sigma[b], xv = ld(x, i);
  // the guided output: needed for x0 (modes 0, 1) and for the network's eps (modes 0, 2)
  const bool net = k.c_eps && !clipped_eps;
  float mv = 0.f;
  if (mode != 2 || net) {
    mv = ld(m, i);
    if (mu) {
      const float u = ld(mu, i);
      mv = u + w * (mv - u);
    }
  }
  float x0;
  if (mode == 2) {
    const float t = th[b];
    x0 = fminf(fmaxf(x0f[i], -t), t) / t;
  } else {
    x0 = pred == 0 ? (xv - s * mv) / a : pred == 1 ? mv : a * xv - s * mv;
    if (clip > 0.f) x0 = fminf(fmaxf(x0, -clip), clip);
    if (mode == 1) {
      x0f[i] = x0;
      return;
    }
  }
  float out = k.c_sample[b] * xv + k.c_x0[b] * x0;
  if (k.c_eps) {
    // diffusers' DDIM: the network's eps unless use_clipped_model_output re-derives it from the clipped x0
    const float eps = !net ? (xv - a * x0) / s : pred == 0 ? mv : pred == 1 ? (xv - a * mv) / s : a * mv + s * xv;
    out += k.c_eps[b] * eps;
  }
  if (px0) out += k.c_prev_x0[b] * ld(px0, i);
  if (noise) out += k.c_noise[b] * ld(noise, i);
  st(prev, i, out);
  st(x0_out, i, x0);
}

}  // namespace

void sampler_step(int dtype, uintptr_t x, uintptr_t m, uintptr_t mu, uintptr_t px0, uintptr_t noise, uintptr_t prev,
                  uintptr_t x0, uintptr_t x0f, uintptr_t th, uintptr_t alpha, uintptr_t sigma, uintptr_t c_sample,
                  uintptr_t c_x0, uintptr_t c_eps, uintptr_t c_noise, uintptr_t c_prev_x0, int64_t B, int64_t N,
                  int pred, double w, double clip, int mode, int clipped_eps, uintptr_t stream) {
  if (B <= 0 || N <= 0) throw std::invalid_argument("biogen: sampler_step: empty input");
  if ((mode == 1 || mode == 2) && x0f == 0) throw std::invalid_argument("biogen: sampler_step: missing x0 buffer");
  if (mode == 2 && th == 0) throw std::invalid_argument("biogen: sampler_step: missing thresholds");
  const Coefs k{(const float*)alpha, (const float*)sigma, (const float*)c_sample, (const float*)c_x0,
                (const float*)c_eps, (const float*)c_noise, (const float*)c_prev_x0};
  const unsigned gx = grid_x((N + 255) / 256, "sampler_step_cuda");
  DeviceGuard guard(x, "sampler_step_cuda");
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for_grid_y(B, [&](int64_t b0, unsigned nb) {  // samples along grid y, sliced past 65,535
      step_kernel<T><<<dim3(gx, nb), 256, 0, (cudaStream_t)stream>>>(
          (const T*)x, (const T*)m, (const T*)mu, (const T*)px0, (const T*)noise, (T*)prev, (T*)x0, (float*)x0f,
          (const float*)th, k, N, pred, float(w), float(clip), mode, clipped_eps != 0, b0);
    });
  };
  switch (dtype) {
    case 0: launch((float*)nullptr); break;
    case 1: launch((__half*)nullptr); break;
    case 2: launch((__nv_bfloat16*)nullptr); break;
    default: throw std::invalid_argument("biogen: sampler_step supports float32, float16 and bfloat16");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("biogen: sampler_step: ") + cudaGetErrorString(err));
}

}  // namespace biogen::cuda
