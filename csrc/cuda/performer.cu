// Performer FAVOR+ attention, CUDA (non-causal), forward and backward. Written to be simple and
// obviously correct rather than fast: one block per (batch*head, feature) or (batch*head, row),
// threads over head_dim or features, block reductions in shared memory. Same maths as
// csrc/cpu/performer.cpp; the key stabiliser is computed first (a max pass), so the key sums need
// no rescaling. Workspaces (C, z, dC, dz, per-row denominators and stabilisers) come from Python.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace biogen::cuda {
namespace {

constexpr int kThreads = 128;  // >= head_dim (at most 128)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Args {
  int B, H, L, D, m;
  int64_t qs[3], ks[3], vs[3], os[3], gs[3];
  const uint8_t* pad;
  const float* W;  // m x D
  float s, ratio, eps;
  bool relu;
};

__device__ __forceinline__ bool valid(const Args& a, int b, int l) { return a.pad == nullptr || a.pad[(int64_t)b * a.L + l] == 0; }

// Sum (or max) over the block; every thread gets the result.
__device__ float block_sum(float x, float* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}
__device__ float block_max(float x, float* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + o]);
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

template <class T>
__device__ float load_row(const Args& a, const T* x, const int64_t* st, int b, int h, int l, float* row) {
  // row[d] for d < D into shared memory; returns s^2 |x|^2 / 2.
  const int d = threadIdx.x;
  float val = 0.f;
  if (d < a.D) val = to_f(x[b * st[0] + h * st[1] + (int64_t)l * st[2] + d]);
  row[d] = val;
  __shared__ float red[kThreads];
  const float sq = block_sum(val * val, red);
  return sq * (a.s * a.s * 0.5f);
}

// Raw projections s x.W_f for every feature into dd[0..m) (threads over features).
__device__ void project_row(const Args& a, const float* row, float* dd) {
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) {
    float acc = 0.f;
    for (int d = 0; d < a.D; ++d) acc += row[d] * a.W[(int64_t)f * a.D + d];
    dd[f] = acc * a.s;
  }
  __syncthreads();
}

// Key stabiliser per (b, h): max over valid keys and features of s k.W_f (0 for relu / no key).
template <class T>
__global__ void key_max_kernel(Args a, const T* k, float* ck) {
  extern __shared__ float sh[];
  float* row = sh;
  float* dd = sh + kThreads;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  float mx = -INFINITY;
  for (int l = 0; l < a.L; ++l) {
    if (!valid(a, b, l)) continue;
    load_row(a, k, a.ks, b, h, l, row);
    __syncthreads();
    project_row(a, row, dd);
    for (int f = threadIdx.x; f < a.m; f += blockDim.x) mx = fmaxf(mx, dd[f]);
    __syncthreads();
  }
  mx = block_max(mx, red);
  if (threadIdx.x == 0) ck[bh] = (a.relu || !isfinite(mx)) ? 0.f : mx;
}

__device__ __forceinline__ float feature(const Args& a, float dd, float diag, float c, float* e_out) {
  const float e = a.relu ? fmaxf(dd, 0.f) : expf(dd - diag - c);
  *e_out = e;
  return a.ratio * (e + a.eps);
}

// C[f, :] = sum_j phi_f(k_j) v_j and z[f] = sum_j phi_f(k_j): grid (B*H, m), threads over head_dim.
template <class T>
__global__ void key_state_kernel(Args a, const T* k, const T* v, const float* ck, float* C, float* z) {
  __shared__ float row[kThreads];
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, f = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
  float acc = 0.f, zacc = 0.f;
  for (int l = 0; l < a.L; ++l) {
    if (!valid(a, b, l)) continue;
    const float diag = load_row(a, k, a.ks, b, h, l, row);
    const float part = d < a.D ? row[d] * a.W[(int64_t)f * a.D + d] : 0.f;
    const float dd = block_sum(part, red) * a.s;
    float e;
    const float phi = feature(a, dd, diag, ck[bh], &e);
    if (d < a.D) acc += phi * to_f(v[b * a.vs[0] + h * a.vs[1] + (int64_t)l * a.vs[2] + d]);
    zacc += phi;
  }
  if (d < a.D) C[((int64_t)bh * a.m + f) * a.D + d] = acc;
  if (d == 0) z[(int64_t)bh * a.m + f] = zacc;
}

// phi(q) of one row into phi[] (and exp part into e[]); returns nothing, stabiliser in *cq.
template <class T>
__device__ void query_features(const Args& a, const T* q, int b, int h, int l, float* row, float* phi, float* e,
                               float* cq_out, float* diag_out) {
  __shared__ float red[kThreads];
  const float diag = load_row(a, q, a.qs, b, h, l, row);
  __syncthreads();
  project_row(a, row, phi);  // raw projections first
  float mx = -INFINITY;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) mx = fmaxf(mx, phi[f]);
  const float cq = a.relu ? 0.f : block_max(mx, red);
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) phi[f] = feature(a, phi[f], diag, cq, &e[f]);
  __syncthreads();
  *cq_out = cq;
  *diag_out = diag;
}

template <class T>
__global__ void query_out_kernel(Args a, const T* q, const float* C, const float* z, T* out) {
  extern __shared__ float sh[];
  float* row = sh;
  float* phi = sh + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
  T* o = out + ((int64_t)bh * a.L + l) * a.D;
  if (!valid(a, b, l)) {
    if (d < a.D) o[d] = from_f<T>(0.f);
    return;
  }
  float cq, diag;
  query_features(a, q, b, h, l, row, phi, e, &cq, &diag);
  float part = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) part += phi[f] * z[(int64_t)bh * a.m + f];
  const float den = block_sum(part, red);
  if (d < a.D) {
    float num = 0.f;
    for (int f = 0; f < a.m; ++f) num += phi[f] * C[((int64_t)bh * a.m + f) * a.D + d];
    o[d] = from_f<T>(num / den);
  }
}

// dq, and the per-row denominator and stabiliser for the dC pass.
template <class T>
__global__ void bwd_query_kernel(Args a, const T* q, const T* out, const T* gout, const float* C, const float* z,
                                 float* dq, float* den_all, float* cq_all) {
  extern __shared__ float sh[];
  float* row = sh;
  float* dnum = sh + kThreads;
  float* phi = dnum + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
  float* o = dq + ((int64_t)bh * a.L + l) * a.D;
  if (!valid(a, b, l)) {
    if (d < a.D) o[d] = 0.f;
    if (d == 0) den_all[(int64_t)bh * a.L + l] = 1.f, cq_all[(int64_t)bh * a.L + l] = 0.f;
    return;
  }
  float cq, diag;
  query_features(a, q, b, h, l, row, phi, e, &cq, &diag);
  float part = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) part += phi[f] * z[(int64_t)bh * a.m + f];
  const float den = block_sum(part, red);
  float g_d = 0.f, o_d = 0.f;
  if (d < a.D) {
    g_d = to_f(gout[b * a.gs[0] + h * a.gs[1] + (int64_t)l * a.gs[2] + d]);
    o_d = to_f(out[b * a.os[0] + h * a.os[1] + (int64_t)l * a.os[2] + d]);
  }
  dnum[d] = g_d / den;
  const float dden = -block_sum(g_d * o_d, red) / den;
  __syncthreads();
  // phi[] becomes G = dphi * dphi/d(dd)
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) {
    float dphi = dden * z[(int64_t)bh * a.m + f];
    for (int dd = 0; dd < a.D; ++dd) dphi += dnum[dd] * C[((int64_t)bh * a.m + f) * a.D + dd];
    phi[f] = a.relu ? (e[f] > 0.f ? dphi : 0.f) : dphi * a.ratio * e[f];
  }
  __syncthreads();
  float gpart = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) gpart += phi[f];
  const float gsum = a.relu ? 0.f : block_sum(gpart, red);
  if (d < a.D) {
    float acc = 0.f;
    for (int f = 0; f < a.m; ++f) acc += phi[f] * a.W[(int64_t)f * a.D + d];
    o[d] = a.s * acc - a.s * a.s * gsum * row[d];
  }
  if (d == 0) den_all[(int64_t)bh * a.L + l] = den, cq_all[(int64_t)bh * a.L + l] = cq;
}

// dC[f, :] = sum_i phi_f(q_i) dnum_i, dz[f] = sum_i dden_i phi_f(q_i): grid (B*H, m).
template <class T>
__global__ void bwd_dc_kernel(Args a, const T* q, const T* out, const T* gout, const float* den_all,
                              const float* cq_all, float* dC, float* dz) {
  __shared__ float row[kThreads];
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, f = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
  float acc = 0.f, zacc = 0.f;
  for (int l = 0; l < a.L; ++l) {
    if (!valid(a, b, l)) continue;
    const float diag = load_row(a, q, a.qs, b, h, l, row);
    const float dd = block_sum(d < a.D ? row[d] * a.W[(int64_t)f * a.D + d] : 0.f, red) * a.s;
    float e;
    const float phi = feature(a, dd, diag, cq_all[(int64_t)bh * a.L + l], &e);
    const float den = den_all[(int64_t)bh * a.L + l];
    float g_d = 0.f, o_d = 0.f;
    if (d < a.D) {
      g_d = to_f(gout[b * a.gs[0] + h * a.gs[1] + (int64_t)l * a.gs[2] + d]);
      o_d = to_f(out[b * a.os[0] + h * a.os[1] + (int64_t)l * a.os[2] + d]);
    }
    const float dden = -block_sum(g_d * o_d, red) / den;
    acc += phi * g_d / den;
    zacc += phi * dden;
  }
  if (d < a.D) dC[((int64_t)bh * a.m + f) * a.D + d] = acc;
  if (d == 0) dz[(int64_t)bh * a.m + f] = zacc;
}

template <class T>
__global__ void bwd_key_kernel(Args a, const T* k, const T* v, const float* ck, const float* dC, const float* dz,
                               float* dk, float* dv) {
  extern __shared__ float sh[];
  float* row = sh;
  float* vrow = sh + kThreads;
  float* phi = vrow + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
  float* ok = dk + ((int64_t)bh * a.L + l) * a.D;
  float* ov = dv + ((int64_t)bh * a.L + l) * a.D;
  if (!valid(a, b, l)) {
    if (d < a.D) ok[d] = 0.f, ov[d] = 0.f;
    return;
  }
  const float diag = load_row(a, k, a.ks, b, h, l, row);
  vrow[d] = d < a.D ? to_f(v[b * a.vs[0] + h * a.vs[1] + (int64_t)l * a.vs[2] + d]) : 0.f;
  __syncthreads();
  project_row(a, row, phi);
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) phi[f] = feature(a, phi[f], diag, ck[bh], &e[f]);
  __syncthreads();
  if (d < a.D) {
    float acc = 0.f;
    for (int f = 0; f < a.m; ++f) acc += phi[f] * dC[((int64_t)bh * a.m + f) * a.D + d];
    ov[d] = acc;
  }
  __syncthreads();
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) {
    float dphi = dz[(int64_t)bh * a.m + f];
    for (int dd = 0; dd < a.D; ++dd) dphi += vrow[dd] * dC[((int64_t)bh * a.m + f) * a.D + dd];
    phi[f] = a.relu ? (e[f] > 0.f ? dphi : 0.f) : dphi * a.ratio * e[f];
  }
  __syncthreads();
  float gpart = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) gpart += phi[f];
  const float gsum = a.relu ? 0.f : block_sum(gpart, red);
  if (d < a.D) {
    float acc = 0.f;
    for (int f = 0; f < a.m; ++f) acc += phi[f] * a.W[(int64_t)f * a.D + d];
    ok[d] = a.s * acc - a.s * a.s * gsum * row[d];
  }
}

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("biogen performer_attention (cuda): ") + cudaGetErrorString(err));
}

template <class F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f((float*)nullptr); break;
    case 1: f((__half*)nullptr); break;
    case 2: f((__nv_bfloat16*)nullptr); break;
    default: throw std::invalid_argument("biogen: performer_attention supports float32, float16 and bfloat16");
  }
}

Args make_args(int B, int H, int L, int D, int m, const int64_t* strides, uintptr_t pad, uintptr_t W, int relu,
               float eps) {
  if (D > kThreads) throw std::invalid_argument("biogen: performer_attention supports head dimension at most 128");
  Args a{};
  a.B = B; a.H = H; a.L = L; a.D = D; a.m = m;
  for (int i = 0; i < 3; ++i) {
    a.qs[i] = strides[i]; a.ks[i] = strides[3 + i]; a.vs[i] = strides[6 + i];
    a.os[i] = strides[9 + i]; a.gs[i] = strides[12 + i];
  }
  a.pad = (const uint8_t*)pad;
  a.W = (const float*)W;
  a.s = powf((float)D, -0.25f);
  a.relu = relu != 0;
  a.ratio = a.relu ? 1.f : 1.f / sqrtf((float)m);
  a.eps = eps;
  return a;
}

}  // namespace

// strides: q, k, v, out, grad_out (3 each; out / grad_out unused in the forward).
// ws_C: B*H*m*D floats, ws_z: B*H*m floats.
void performer_fwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t W, uintptr_t out, uintptr_t ck,
                   uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z, int B, int H, int L, int D, int m,
                   const int64_t* strides, int relu, float eps, uintptr_t stream_handle) {
  Args a = make_args(B, H, L, D, m, strides, pad, W, relu, eps);
  cudaStream_t stream = (cudaStream_t)stream_handle;
  const size_t sh_feat = (kThreads + 2 * (size_t)m) * sizeof(float);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    key_max_kernel<T><<<B * H, kThreads, sh_feat, stream>>>(a, (const T*)k, (float*)ck);
    key_state_kernel<T><<<dim3(B * H, m), kThreads, 0, stream>>>(a, (const T*)k, (const T*)v, (const float*)ck,
                                                               (float*)ws_C, (float*)ws_z);
    query_out_kernel<T><<<dim3(B * H, L), kThreads, sh_feat, stream>>>(a, (const T*)q, (const float*)ws_C,
                                                                      (const float*)ws_z, (T*)out);
  });
  check(cudaGetLastError());
}

// ws: C (B*H*m*D), z (B*H*m), dC (B*H*m*D), dz (B*H*m), den (B*H*L), cq (B*H*L), ck (B*H) floats.
void performer_bwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t W, uintptr_t out, uintptr_t gout,
                   uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z,
                   uintptr_t ws_dC, uintptr_t ws_dz, uintptr_t ws_den, uintptr_t ws_cq, uintptr_t ws_ck, int B, int H,
                   int L, int D, int m, const int64_t* strides, int relu, float eps, uintptr_t stream_handle) {
  Args a = make_args(B, H, L, D, m, strides, pad, W, relu, eps);
  cudaStream_t stream = (cudaStream_t)stream_handle;
  const size_t sh_feat = (kThreads + 2 * (size_t)m) * sizeof(float);
  const size_t sh_bwd = (2 * kThreads + 2 * (size_t)m) * sizeof(float);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    key_max_kernel<T><<<B * H, kThreads, sh_feat, stream>>>(a, (const T*)k, (float*)ws_ck);
    key_state_kernel<T><<<dim3(B * H, m), kThreads, 0, stream>>>(a, (const T*)k, (const T*)v,
                                                               (const float*)ws_ck, (float*)ws_C, (float*)ws_z);
    bwd_query_kernel<T><<<dim3(B * H, L), kThreads, sh_bwd, stream>>>(
        a, (const T*)q, (const T*)out, (const T*)gout, (const float*)ws_C, (const float*)ws_z, (float*)dq,
        (float*)ws_den, (float*)ws_cq);
    bwd_dc_kernel<T><<<dim3(B * H, m), kThreads, 0, stream>>>(a, (const T*)q, (const T*)out, (const T*)gout,
                                                            (const float*)ws_den, (const float*)ws_cq,
                                                            (float*)ws_dC, (float*)ws_dz);
    bwd_key_kernel<T><<<dim3(B * H, L), kThreads, sh_bwd, stream>>>(a, (const T*)k, (const T*)v,
                                                                  (const float*)ws_ck, (const float*)ws_dC,
                                                                  (const float*)ws_dz, (float*)dk, (float*)dv);
  });
  check(cudaGetLastError());
}

}  // namespace biogen::cuda
