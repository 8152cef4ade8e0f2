// Masked gene attention (SPEC 1.1) on CUDA, forward and backward.
//
// Written to be plainly correct rather than fast: fp32 maths throughout, one block per
// (batch, head, 64-row tile), 4 threads per row (each owning every 4th feature, so a dot product is a
// 4-lane butterfly), the other side streamed through shared memory in 32-row tiles. Tiles with no
// allowed key (padding, unknown genes) or no valid query are skipped, which is where the speed over
// a dense mask comes from.
//
// The generative mask is exact and never per pair: the streamed keys are the valid AND known ones
// (a per-key flag), and an unknown query's only other allowed key, itself, is folded in at the end
// (online softmax with one more score). The backward has no atomics (deterministic): dK/dV blocks
// own their key rows, dQ blocks their query rows; an unknown key's gradient comes from its own
// query only, so the dK/dV block computes that self term itself.
//
// Padded positions are never read, so NaN stored there cannot reach any output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "biogen/common.h"
#include "biogen/cuda_launch.cuh"
#include "biogen/masked_attention_cuda.h"

namespace biogen::cuda {
namespace {

constexpr int kGroup = 4;                 // threads per row
constexpr int kRows = 64;                 // rows owned by one block
constexpr int kThreads = kRows * kGroup;  // 256: whole warps, so every shuffle has all 32 lanes
constexpr int kTile = 32;                 // rows of the streamed side per shared-memory tile

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Butterfly over the 4 lanes of a row: every lane ends with the same bit-identical sum (float
// addition is commutative), so all 4 take the same softmax decisions.
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

struct Strides {
  int64_t b, h, l;
};

struct Masks {
  const uint8_t* pad;    // (B, L), nonzero = padding; null = none
  const uint8_t* known;  // (B, L), nonzero = known; null = all known
  int64_t L;
  __device__ bool valid(int64_t b, int64_t j) const { return pad == nullptr || pad[b * L + j] == 0; }
  __device__ bool is_known(int64_t b, int64_t j) const { return known == nullptr || known[b * L + j] != 0; }
};

// This thread's features (sub, sub + 4, ...) of one row; zeros where !ok (the row is not read).
template <typename T, int DPT>
__device__ __forceinline__ void load_slice(float (&r)[DPT], const T* row, int sub, int D, bool ok) {
#pragma unroll
  for (int t = 0; t < DPT; ++t) {
    const int d = sub + kGroup * t;
    r[t] = (ok && d < D) ? to_f(row[d]) : 0.f;
  }
}

// kTile rows starting at j0 into shared memory; rows whose flag is 0 become zeros without a read.
template <typename T, int DM>
__device__ __forceinline__ void load_tile(float (*dst)[DM], const T* base, int64_t row_stride, int64_t j0,
                                          const int* ok, int D) {
  for (int idx = threadIdx.x; idx < kTile * DM; idx += kThreads) {
    const int jj = idx / DM, d = idx % DM;
    dst[jj][d] = (ok[jj] && d < D) ? to_f(base[(j0 + jj) * row_stride + d]) : 0.f;
  }
}

// ------------------------------------------------------------------------------------ forward

template <typename T, int DPT>
__global__ void __launch_bounds__(kThreads)
fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
           float* __restrict__ lse, Masks mk, int H, int L, int D, Strides sq, Strides sk, Strides sv,
           float scale, int n_tiles) {
  constexpr int DM = DPT * kGroup;
  __shared__ float Ks[kTile][DM];
  __shared__ float Vs[kTile][DM];
  __shared__ int kok[kTile];

  const int64_t bh = blockIdx.x / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int r = threadIdx.x / kGroup, sub = threadIdx.x % kGroup;
  const int64_t i = (int64_t)(blockIdx.x % n_tiles) * kRows + r;
  const bool in_range = i < L;
  const bool qvalid = in_range && mk.valid(b, i);
  const bool self_term = qvalid && !mk.is_known(b, i);
  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;

  float qr[DPT], acc[DPT];
  load_slice<T, DPT>(qr, q + b * sq.b + h * sq.h + i * sq.l, sub, D, qvalid);
#pragma unroll
  for (int t = 0; t < DPT; ++t) acc[t] = 0.f;
  float m = -INFINITY, l = 0.f;

  if (__syncthreads_or(qvalid)) {  // block-uniform: a tile of padding only writes zeros
    for (int64_t j0 = 0; j0 < L; j0 += kTile) {
      __syncthreads();  // the previous tile is consumed
      int ok = 0;
      if (threadIdx.x < kTile) {
        const int64_t j = j0 + threadIdx.x;
        ok = j < L && mk.valid(b, j) && mk.is_known(b, j);
        kok[threadIdx.x] = ok;
      }
      if (!__syncthreads_or(ok)) continue;  // no valid known key here
      load_tile<T, DM>(Ks, kb, sk.l, j0, kok, D);
      load_tile<T, DM>(Vs, vb, sv.l, j0, kok, D);
      __syncthreads();

      float s[kTile];
      float tmax = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < kTile; ++jj) {
        float part = 0.f;
#pragma unroll
        for (int t = 0; t < DPT; ++t) part += qr[t] * Ks[jj][sub + kGroup * t];
        part = group_sum(part) * scale;
        s[jj] = kok[jj] ? part : -INFINITY;
        tmax = fmaxf(tmax, s[jj]);
      }
      const float m_new = fmaxf(m, tmax);  // finite: this tile holds an allowed key
      const float alpha = expf(m - m_new);  // exact expf: 0 for the first tile (m = -inf)
      l *= alpha;
#pragma unroll
      for (int t = 0; t < DPT; ++t) acc[t] *= alpha;
#pragma unroll
      for (int jj = 0; jj < kTile; ++jj) {
        const float p = kok[jj] ? expf(s[jj] - m_new) : 0.f;
        l += p;
#pragma unroll
        for (int t = 0; t < DPT; ++t) acc[t] += p * Vs[jj][sub + kGroup * t];
      }
      m = m_new;
    }

    // An unknown query also attends itself: one more score into the online softmax.
    float kr[DPT];
    load_slice<T, DPT>(kr, kb + i * sk.l, sub, D, self_term);
    float part = 0.f;
#pragma unroll
    for (int t = 0; t < DPT; ++t) part += qr[t] * kr[t];
    const float s_self = group_sum(part) * scale;  // all lanes shuffle, then only self rows use it
    if (self_term) {
      float vr[DPT];
      load_slice<T, DPT>(vr, vb + i * sv.l, sub, D, true);
      const float m_new = fmaxf(m, s_self);
      const float alpha = expf(m - m_new), p = expf(s_self - m_new);
      l = l * alpha + p;
#pragma unroll
      for (int t = 0; t < DPT; ++t) acc[t] = acc[t] * alpha + p * vr[t];
      m = m_new;
    }
  }

  if (!in_range) return;
  const int64_t row = bh * L + i;
  const bool has = qvalid && l > 0.f;  // every valid query has a key: itself or a known one
  T* orow = out + row * D;
#pragma unroll
  for (int t = 0; t < DPT; ++t) {
    const int d = sub + kGroup * t;
    if (d < D) orow[d] = from_f<T>(has ? acc[t] / l : 0.f);
  }
  if (sub == 0) lse[row] = has ? m + logf(l) : -INFINITY;
}

// ------------------------------------------------------------------------------------ backward

// delta[row] = sum_d dO * O (0 for padded rows, which are not read). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
delta_kernel(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ delta, Masks mk, int H,
             int L, int D, Strides so, Strides sg, int64_t rows) {
  const int64_t row = (int64_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // uniform within the warp
  const int64_t i = row % L, bh = row / L, b = bh / H, h = bh % H;
  float acc = 0.f;
  if (mk.valid(b, i)) {
    const T* o = out + b * so.b + h * so.h + i * so.l;
    const T* g = dout + b * sg.b + h * sg.h + i * sg.l;
    for (int d = lane; d < D; d += 32) acc += to_f(o[d]) * to_f(g[d]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// dQ of one tile of queries over the valid known keys (+ the self term of unknown queries).
template <typename T, int DPT>
__global__ void __launch_bounds__(kThreads)
dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
          const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq, Masks mk, int H,
          int L, int D, Strides sq, Strides sk, Strides sv, Strides sg, float scale, int n_tiles) {
  constexpr int DM = DPT * kGroup;
  __shared__ float Ks[kTile][DM];
  __shared__ float Vs[kTile][DM];
  __shared__ int kok[kTile];

  const int64_t bh = blockIdx.x / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int r = threadIdx.x / kGroup, sub = threadIdx.x % kGroup;
  const int64_t i = (int64_t)(blockIdx.x % n_tiles) * kRows + r;
  const bool in_range = i < L;
  const bool qvalid = in_range && mk.valid(b, i);
  const bool self_term = qvalid && !mk.is_known(b, i);
  const int64_t row = bh * L + i;
  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;

  float qr[DPT], gr[DPT], acc[DPT];
  load_slice<T, DPT>(qr, q + b * sq.b + h * sq.h + i * sq.l, sub, D, qvalid);
  load_slice<T, DPT>(gr, dout + b * sg.b + h * sg.h + i * sg.l, sub, D, qvalid);
#pragma unroll
  for (int t = 0; t < DPT; ++t) acc[t] = 0.f;
  const float lse_i = qvalid ? lse[row] : 0.f;  // finite for every valid query
  const float delta_i = qvalid ? delta[row] : 0.f;

  if (__syncthreads_or(qvalid)) {
    for (int64_t j0 = 0; j0 < L; j0 += kTile) {
      __syncthreads();
      int ok = 0;
      if (threadIdx.x < kTile) {
        const int64_t j = j0 + threadIdx.x;
        ok = j < L && mk.valid(b, j) && mk.is_known(b, j);
        kok[threadIdx.x] = ok;
      }
      if (!__syncthreads_or(ok)) continue;
      load_tile<T, DM>(Ks, kb, sk.l, j0, kok, D);
      load_tile<T, DM>(Vs, vb, sv.l, j0, kok, D);
      __syncthreads();
#pragma unroll 4
      for (int jj = 0; jj < kTile; ++jj) {
        float sp = 0.f, dp = 0.f;
#pragma unroll
        for (int t = 0; t < DPT; ++t) {
          sp += qr[t] * Ks[jj][sub + kGroup * t];
          dp += gr[t] * Vs[jj][sub + kGroup * t];
        }
        sp = group_sum(sp) * scale;
        dp = group_sum(dp);
        const float p = (kok[jj] && qvalid) ? expf(sp - lse_i) : 0.f;
        const float ds = p * (dp - delta_i);
#pragma unroll
        for (int t = 0; t < DPT; ++t) acc[t] += ds * Ks[jj][sub + kGroup * t];
      }
    }

    float kr[DPT], vr[DPT];
    load_slice<T, DPT>(kr, kb + i * sk.l, sub, D, self_term);
    load_slice<T, DPT>(vr, vb + i * sv.l, sub, D, self_term);
    float sp = 0.f, dp = 0.f;
#pragma unroll
    for (int t = 0; t < DPT; ++t) {
      sp += qr[t] * kr[t];
      dp += gr[t] * vr[t];
    }
    sp = group_sum(sp) * scale;
    dp = group_sum(dp);
    if (self_term) {
      const float p = expf(sp - lse_i);
      const float ds = p * (dp - delta_i);
#pragma unroll
      for (int t = 0; t < DPT; ++t) acc[t] += ds * kr[t];
    }
  }

  if (!in_range) return;
  float* drow = dq + row * D;
#pragma unroll
  for (int t = 0; t < DPT; ++t) {
    const int d = sub + kGroup * t;
    if (d < D) drow[d] = acc[t] * scale;
  }
}

// dK, dV of one tile of keys: known keys over all valid queries; unknown keys from their own query.
template <typename T, int DPT>
__global__ void __launch_bounds__(kThreads)
dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
            const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
            float* __restrict__ dk, float* __restrict__ dv, Masks mk, int H, int L, int D, Strides sq, Strides sk,
            Strides sv, Strides sg, float scale, int n_tiles) {
  constexpr int DM = DPT * kGroup;
  __shared__ float Qs[kTile][DM];
  __shared__ float Gs[kTile][DM];
  __shared__ float lse_s[kTile];
  __shared__ float delta_s[kTile];
  __shared__ int qok[kTile];

  const int64_t bh = blockIdx.x / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int r = threadIdx.x / kGroup, sub = threadIdx.x % kGroup;
  const int64_t j = (int64_t)(blockIdx.x % n_tiles) * kRows + r;
  const bool in_range = j < L;
  const bool kvalid = in_range && mk.valid(b, j);
  const bool kknown = in_range && mk.is_known(b, j);
  const bool kallowed = kvalid && kknown;
  const bool self_term = kvalid && !kknown;
  const int64_t row = bh * L + j;
  const T* qb = q + b * sq.b + h * sq.h;
  const T* gb = dout + b * sg.b + h * sg.h;

  float kr[DPT], vr[DPT], dka[DPT], dva[DPT];
  load_slice<T, DPT>(kr, k + b * sk.b + h * sk.h + j * sk.l, sub, D, kvalid);
  load_slice<T, DPT>(vr, v + b * sv.b + h * sv.h + j * sv.l, sub, D, kvalid);
#pragma unroll
  for (int t = 0; t < DPT; ++t) dka[t] = dva[t] = 0.f;

  if (__syncthreads_or(kallowed)) {  // a tile of padding / unknown keys only has self terms
    for (int64_t i0 = 0; i0 < L; i0 += kTile) {
      __syncthreads();
      int ok = 0;
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        ok = i < L && mk.valid(b, i);
        qok[threadIdx.x] = ok;
        lse_s[threadIdx.x] = ok ? lse[bh * L + i] : 0.f;
        delta_s[threadIdx.x] = ok ? delta[bh * L + i] : 0.f;
      }
      if (!__syncthreads_or(ok)) continue;  // no valid query here
      load_tile<T, DM>(Qs, qb, sq.l, i0, qok, D);
      load_tile<T, DM>(Gs, gb, sg.l, i0, qok, D);
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < kTile; ++ii) {
        float sp = 0.f, dp = 0.f;
#pragma unroll
        for (int t = 0; t < DPT; ++t) {
          sp += Qs[ii][sub + kGroup * t] * kr[t];
          dp += Gs[ii][sub + kGroup * t] * vr[t];
        }
        sp = group_sum(sp) * scale;
        dp = group_sum(dp);
        const float p = (qok[ii] && kallowed) ? expf(sp - lse_s[ii]) : 0.f;
        const float ds = p * (dp - delta_s[ii]);
#pragma unroll
        for (int t = 0; t < DPT; ++t) {
          dva[t] += p * Gs[ii][sub + kGroup * t];
          dka[t] += ds * Qs[ii][sub + kGroup * t];
        }
      }
    }
  }

  {
    float qr[DPT], gr[DPT];
    load_slice<T, DPT>(qr, qb + j * sq.l, sub, D, self_term);
    load_slice<T, DPT>(gr, gb + j * sg.l, sub, D, self_term);
    float sp = 0.f, dp = 0.f;
#pragma unroll
    for (int t = 0; t < DPT; ++t) {
      sp += qr[t] * kr[t];
      dp += gr[t] * vr[t];
    }
    sp = group_sum(sp) * scale;
    dp = group_sum(dp);
    if (self_term) {
      const float p = expf(sp - lse[row]);
      const float ds = p * (dp - delta[row]);
#pragma unroll
      for (int t = 0; t < DPT; ++t) {
        dva[t] += p * gr[t];
        dka[t] += ds * qr[t];
      }
    }
  }

  if (!in_range) return;
  float* dkrow = dk + row * D;
  float* dvrow = dv + row * D;
#pragma unroll
  for (int t = 0; t < DPT; ++t) {
    const int d = sub + kGroup * t;
    if (d < D) {
      dkrow[d] = dka[t] * scale;
      dvrow[d] = dva[t];
    }
  }
}

// ------------------------------------------------------------------------------------ host side

// Features per thread: the smallest of 4, 8, 16, 32 with 4 * DPT >= D.
int dpt_for(int64_t D) { return D <= 16 ? 4 : D <= 32 ? 8 : D <= 64 ? 16 : 32; }

#define BIOGEN_DPT_SWITCH(D, ...)                  \
  switch (dpt_for(D)) {                            \
    case 4: { constexpr int DPT = 4; __VA_ARGS__; break; }   \
    case 8: { constexpr int DPT = 8; __VA_ARGS__; break; }   \
    case 16: { constexpr int DPT = 16; __VA_ARGS__; break; } \
    default: { constexpr int DPT = 32; __VA_ARGS__; break; } \
  }

#define BIOGEN_CUDA_TYPE_SWITCH(dtype, op, ...)                                                  \
  switch ((DType)(dtype)) {                                                                      \
    case DType::f32: { using T = float; __VA_ARGS__; break; }                                    \
    case DType::f16: { using T = __half; __VA_ARGS__; break; }                                   \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }                           \
    default: throw std::invalid_argument(std::string("biogen: ") + (op) + " supports float32, float16 and bfloat16"); \
  }

void check_sizes(const char* op, int64_t B, int64_t H, int64_t L, int64_t D, int64_t* n_tiles, int* blocks) {
  BIOGEN_CHECK(B > 0 && H > 0 && L > 0, std::string(op) + ": empty input");
  BIOGEN_CHECK(D >= 1 && D <= 128, std::string(op) + " supports head dimension 1 to 128, got " + std::to_string(D));
  *n_tiles = (L + kRows - 1) / kRows;
  const int64_t nb = B * H * *n_tiles;
  BIOGEN_CHECK(nb <= INT_MAX && L <= INT_MAX && H <= INT_MAX,
               std::string(op) + ": batch * heads * ceil(length / 64) must be below 2^31");
  *blocks = (int)nb;
}

}  // namespace

void masked_attention_fwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                          uintptr_t key_padding_mask, uintptr_t known, int64_t B, int64_t H, int64_t L,
                          int64_t D, int64_t sqb, int64_t sqh, int64_t sql, int64_t skb, int64_t skh,
                          int64_t skl, int64_t svb, int64_t svh, int64_t svl, double scale, uintptr_t stream) {
  const char* op = "masked_attention_fwd_cuda";
  int64_t n_tiles = 0;
  int blocks = 0;
  check_sizes(op, B, H, L, D, &n_tiles, &blocks);
  DeviceGuard guard(q, op);
  const Masks mk{reinterpret_cast<const uint8_t*>(key_padding_mask), reinterpret_cast<const uint8_t*>(known), L};
  const Strides sq{sqb, sqh, sql}, sk{skb, skh, skl}, sv{svb, svh, svl};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  BIOGEN_CUDA_TYPE_SWITCH(dtype, op, BIOGEN_DPT_SWITCH(D, (fwd_kernel<T, DPT><<<blocks, kThreads, 0, s>>>(
      reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
      reinterpret_cast<T*>(out), reinterpret_cast<float*>(lse), mk, (int)H, (int)L, (int)D, sq, sk, sv,
      (float)scale, (int)n_tiles))));
  check_cuda(cudaGetLastError(), op, "kernel launch");
}

void masked_attention_bwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t grad_out,
                          uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t key_padding_mask,
                          uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sqb, int64_t sqh,
                          int64_t sql, int64_t skb, int64_t skh, int64_t skl, int64_t svb, int64_t svh,
                          int64_t svl, int64_t sob, int64_t soh, int64_t sol, int64_t sgb, int64_t sgh,
                          int64_t sgl, double scale, uintptr_t stream) {
  const char* op = "masked_attention_bwd_cuda";
  int64_t n_tiles = 0;
  int blocks = 0;
  check_sizes(op, B, H, L, D, &n_tiles, &blocks);
  const int64_t rows = B * H * L;
  const int64_t delta_blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  BIOGEN_CHECK(delta_blocks <= INT_MAX, std::string(op) + ": batch * heads * length too large");
  DeviceGuard guard(q, op);
  const Masks mk{reinterpret_cast<const uint8_t*>(key_padding_mask), reinterpret_cast<const uint8_t*>(known), L};
  const Strides sq{sqb, sqh, sql}, sk{skb, skh, skl}, sv{svb, svh, svl}, so{sob, soh, sol}, sg{sgb, sgh, sgl};
  auto s = reinterpret_cast<cudaStream_t>(stream);

  // Delta = rowsum(dO * O): stream-ordered scratch, freed on the same stream after its readers.
  struct Scratch {
    float* p = nullptr;
    cudaStream_t s;
    ~Scratch() {
      if (p) cudaFreeAsync(p, s);
    }
  } delta{nullptr, s};
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&delta.p), (size_t)rows * sizeof(float), s), op,
             "cudaMallocAsync of the (B, H, L) delta buffer");

  BIOGEN_CUDA_TYPE_SWITCH(dtype, op, {
    const T* qp = reinterpret_cast<const T*>(q);
    const T* kp = reinterpret_cast<const T*>(k);
    const T* vp = reinterpret_cast<const T*>(v);
    const T* gp = reinterpret_cast<const T*>(grad_out);
    const float* lp = reinterpret_cast<const float*>(lse);
    delta_kernel<T><<<(int)delta_blocks, kThreads, 0, s>>>(reinterpret_cast<const T*>(out), gp, delta.p, mk,
                                                          (int)H, (int)L, (int)D, so, sg, rows);
    check_cuda(cudaGetLastError(), op, "delta kernel launch");
    BIOGEN_DPT_SWITCH(D, {
      dkdv_kernel<T, DPT><<<blocks, kThreads, 0, s>>>(qp, kp, vp, gp, lp, delta.p, reinterpret_cast<float*>(dk),
                                                      reinterpret_cast<float*>(dv), mk, (int)H, (int)L, (int)D,
                                                      sq, sk, sv, sg, (float)scale, (int)n_tiles);
      check_cuda(cudaGetLastError(), op, "dK/dV kernel launch");
      dq_kernel<T, DPT><<<blocks, kThreads, 0, s>>>(qp, kp, vp, gp, lp, delta.p, reinterpret_cast<float*>(dq), mk,
                                                    (int)H, (int)L, (int)D, sq, sk, sv, sg, (float)scale,
                                                    (int)n_tiles);
      check_cuda(cudaGetLastError(), op, "dQ kernel launch");
    })
  })
}

}  // namespace biogen::cuda
