// CUDA group_norm_silu (SPEC 1.3): one block per (batch, group). Forward: shifted sums -> block
// reduction -> mean / rstd -> apply. Backward: per channel of the group, block-reduced sums of dz and
// dz xhat (written per (b, c) for the parameter grads), then dx = P dz + Q (x - mean) + R.
// Strided indexing (batch, channel, flattened spatial) serves NCHW and channels-last alike.
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

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum of v over the block; every thread gets the result. `buf` holds kThreads floats.
__device__ float block_sum(float v, float* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) buf[threadIdx.x] += buf[threadIdx.x + off];
    __syncthreads();
  }
  const float r = buf[0];
  __syncthreads();
  return r;
}

struct Shape {
  int64_t C, S, G, cpg, sB, sC, sS;
};

__device__ __forceinline__ void coefs(const float* w, const float* bias, const float* scale, const float* shift,
                                      int64_t b, int64_t ch, const Shape& sh, float mean, float rstd, float* f,
                                      float* A, float* Bc) {
  const float ws = w[ch] * rstd;
  *f = scale ? 1.f + scale[b * sh.C + ch] : 1.f;
  const float t = shift ? shift[b * sh.C + ch] : 0.f;
  *A = ws * *f;
  *Bc = (bias[ch] - mean * ws) * *f + t;
}

__device__ __forceinline__ float silu_grad(float z, float* silu) {
  const float s = 1.f / (1.f + __expf(-z));
  *silu = z * s;
  return s * (1.f + z * (1.f - s));
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ x, const float* w, const float* bias, const float* scale,
                           const float* shift, T* __restrict__ y, float* mean_out, float* rstd_out, Shape sh,
                           float eps, int act) {
  __shared__ float buf[kThreads];
  const int64_t bg = blockIdx.x, b = bg / sh.G, g = bg % sh.G;
  const int64_t n = sh.cpg * sh.S;
  const T* xb = x + b * sh.sB + g * sh.cpg * sh.sC;
  const float K = to_f(xb[0]);
  float a1 = 0.f, a2 = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t c = e / sh.S, s = e % sh.S;
    const float d = to_f(xb[c * sh.sC + s * sh.sS]) - K;
    a1 += d;
    a2 += d * d;
  }
  const float m1 = block_sum(a1, buf) / float(n);
  const float var = fmaxf(block_sum(a2, buf) / float(n) - m1 * m1, 0.f);
  const float mean = K + m1, rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    mean_out[bg] = mean;
    rstd_out[bg] = rstd;
  }
  T* yb = y + b * sh.sB + g * sh.cpg * sh.sC;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t c = e / sh.S, s = e % sh.S;
    float f, A, Bc;
    coefs(w, bias, scale, shift, b, g * sh.cpg + c, sh, mean, rstd, &f, &A, &Bc);
    float z = to_f(xb[c * sh.sC + s * sh.sS]) * A + Bc;
    if (act == 1) {
      float out;
      silu_grad(z, &out);
      z = out;
    }
    yb[c * sh.sC + s * sh.sS] = from_f<T>(z);
  }
}

template <typename T>
__global__ void bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* w, const float* bias,
                           const float* scale, const float* shift, const float* mean_in, const float* rstd_in,
                           T* __restrict__ dx, float* sum_dz, float* sum_dzx, Shape sh, int act) {
  __shared__ float buf[kThreads];
  const int64_t bg = blockIdx.x, b = bg / sh.G, g = bg % sh.G;
  const float mean = mean_in[bg], rstd = rstd_in[bg];
  const int64_t off = b * sh.sB + g * sh.cpg * sh.sC;
  float G1 = 0.f, G2 = 0.f;  // identical in every thread (block_sum broadcasts)
  for (int64_t c = 0; c < sh.cpg; ++c) {
    const int64_t ch = g * sh.cpg + c;
    float f, A, Bc;
    coefs(w, bias, scale, shift, b, ch, sh, mean, rstd, &f, &A, &Bc);
    float a1 = 0.f, a2 = 0.f;
    for (int64_t s = threadIdx.x; s < sh.S; s += kThreads) {
      const int64_t i = off + c * sh.sC + s * sh.sS;
      const float xv = to_f(x[i]);
      float dz = to_f(dy[i]);
      if (act == 1) {
        float unused;
        dz *= silu_grad(xv * A + Bc, &unused);
      }
      a1 += dz;
      a2 += dz * (xv - mean) * rstd;
    }
    const float s1 = block_sum(a1, buf), s2 = block_sum(a2, buf);
    if (threadIdx.x == 0) {
      sum_dz[b * sh.C + ch] = s1;
      sum_dzx[b * sh.C + ch] = s2;
    }
    G1 += f * w[ch] * s1;
    G2 += f * w[ch] * s2;
  }
  const float n = float(sh.cpg * sh.S);
  const float Q = -rstd * rstd * G2 / n, R = -rstd * G1 / n;
  for (int64_t e = threadIdx.x; e < sh.cpg * sh.S; e += kThreads) {
    const int64_t c = e / sh.S, s = e % sh.S, ch = g * sh.cpg + c;
    const int64_t i = off + c * sh.sC + s * sh.sS;
    float f, A, Bc;
    coefs(w, bias, scale, shift, b, ch, sh, mean, rstd, &f, &A, &Bc);
    const float xv = to_f(x[i]);
    float dz = to_f(dy[i]);
    if (act == 1) {
      float unused;
      dz *= silu_grad(xv * A + Bc, &unused);
    }
    dx[i] = from_f<T>(dz * rstd * f * w[ch] + (xv - mean) * Q + R);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("biogen: ") + what + ": " + cudaGetErrorString(err));
}

Shape make_shape(int64_t B, int64_t C, int64_t S, int64_t G, int channels_last) {
  if (G <= 0 || C % G != 0) throw std::invalid_argument("biogen: group_norm: channels must be divisible by num_groups");
  if (B <= 0 || S <= 0) throw std::invalid_argument("biogen: group_norm: empty input");
  return channels_last ? Shape{C, S, G, C / G, S * C, 1, C} : Shape{C, S, G, C / G, C * S, S, 1};
}

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f((float*)nullptr); break;
    case 1: f((__half*)nullptr); break;
    case 2: f((__nv_bfloat16*)nullptr); break;
    default: throw std::invalid_argument("biogen: group_norm_silu supports float32, float16 and bfloat16");
  }
}

}  // namespace

void group_norm_fwd(int dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift, uintptr_t y,
                    uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last,
                    double eps, int act, uintptr_t stream) {
  const Shape sh = make_shape(B, C, S, G, channels_last);
  const unsigned blocks = grid_x(B * G, "group_norm_fwd_cuda");
  DeviceGuard guard(x, "group_norm_fwd_cuda");
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwd_kernel<T><<<blocks, kThreads, 0, (cudaStream_t)stream>>>(
        (const T*)x, (const float*)w, (const float*)b, (const float*)scale, (const float*)shift, (T*)y,
        (float*)mean, (float*)rstd, sh, float(eps), act);
  });
  check_launch("group_norm_fwd");
}

void group_norm_bwd(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale,
                    uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t sum_dz,
                    uintptr_t sum_dzx, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last, int act,
                    uintptr_t stream) {
  const Shape sh = make_shape(B, C, S, G, channels_last);
  const unsigned blocks = grid_x(B * G, "group_norm_bwd_cuda");
  DeviceGuard guard(x, "group_norm_bwd_cuda");
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    bwd_kernel<T><<<blocks, kThreads, 0, (cudaStream_t)stream>>>(
        (const T*)dy, (const T*)x, (const float*)w, (const float*)b, (const float*)scale, (const float*)shift,
        (const float*)mean, (const float*)rstd, (T*)dx, (float*)sum_dz, (float*)sum_dzx, sh, act);
  });
  check_launch("group_norm_bwd");
}

}  // namespace biogen::cuda
