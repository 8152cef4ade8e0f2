// Performer FAVOR+ attention, CUDA, forward and backward. Written to be simple and obviously
// correct rather than fast: non-causal, one block per (batch*head, feature) or (batch*head, row),
// threads over head_dim or features, block reductions in shared memory. Same maths as
// csrc/cpu/performer.cpp; the key stabiliser is computed first (a max pass), so the key sums need
// no rescaling. Causal: one block per (batch*head) and a chunked prefix-sum sweep (causal section).
// Workspaces (C, z, dC, dz, per-row denominators and stabilisers) come from Python.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "biogen/cuda_launch.cuh"

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
  bool relu, causal;
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
__global__ void key_state_kernel(Args a, int y0, const T* k, const T* v, const float* ck, float* C, float* z) {
  __shared__ float row[kThreads];
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, f = int(blockIdx.y) + y0, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
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
__global__ void query_out_kernel(Args a, int y0, const T* q, const float* C, const float* z, T* out) {
  extern __shared__ float sh[];
  float* row = sh;
  float* phi = sh + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = int(blockIdx.y) + y0, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
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
__global__ void bwd_query_kernel(Args a, int y0, const T* q, const T* out, const T* gout, const float* C, const float* z,
                                 float* dq, float* den_all, float* cq_all) {
  extern __shared__ float sh[];
  float* row = sh;
  float* dnum = sh + kThreads;
  float* phi = dnum + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = int(blockIdx.y) + y0, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
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
__global__ void bwd_dc_kernel(Args a, int y0, const T* q, const T* out, const T* gout, const float* den_all,
                              const float* cq_all, float* dC, float* dz) {
  __shared__ float row[kThreads];
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, f = int(blockIdx.y) + y0, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
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
__global__ void bwd_key_kernel(Args a, int y0, const T* k, const T* v, const float* ck, const float* dC, const float* dz,
                               float* dk, float* dv) {
  extern __shared__ float sh[];
  float* row = sh;
  float* vrow = sh + kThreads;
  float* phi = vrow + kThreads;
  float* e = phi + a.m;
  __shared__ float red[kThreads];
  const int bh = blockIdx.x, l = int(blockIdx.y) + y0, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
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

// ----------------------------------------------------------------------------- causal
//
// One block per (batch, head) walks the sequence in chunks of C rows (C from causal_chunk: the
// chunk's inputs and features fit the 48 KB of shared memory). The prefix state lives in global
// workspaces owned by the block: S = sum phi(k_j) v_j^T (m x D) and z = sum phi(k_j) (m). With
// A = tril(phi(Q_c) phi(K_c)^T):
//   out_c = (phi(Q_c) S + A V_c) / (phi(Q_c) (z + 1e-6) + rowsum(A)),  then S += phi(K_c)^T V_c,
// performer-pytorch's causal_linear_attention_noncuda including its 1e-6. The backward is a forward
// sweep for dq and a reverse sweep (R = sum phi(q_i) dnum_i^T, r = sum dden_i phi(q_i) over later
// chunks) for dk, dv; the maths is that of csrc/cpu/performer.cpp. Every phase is separated by
// __syncthreads, which also orders the block's own global-memory state updates.

constexpr float kCausalEps = 1e-6f;
constexpr int kMaxChunk = 16;
constexpr size_t kCausalSmem = 46 * 1024;  // dynamic shared memory, below the 48 KB default

__host__ __device__ inline size_t causal_smem_floats(int C, int D, int m) {
  return 6 * (size_t)C * D + 4 * (size_t)C * m + (size_t)C * C + 5 * (size_t)C;
}

int causal_chunk(int D, int m) {
  for (int C = kMaxChunk; C >= 1; C /= 2)
    if (causal_smem_floats(C, D, m) * sizeof(float) <= kCausalSmem) return C;
  throw std::invalid_argument("biogen: causal performer_attention (cuda) needs " +
                              std::to_string(causal_smem_floats(1, D, m) * sizeof(float)) +
                              " bytes of shared memory per row; use fewer random features");
}

struct Chunk {  // one chunk's buffers in dynamic shared memory
  float *Xq, *Xk, *V, *G, *O, *Y, *Pq, *Pk, *Eq, *Ek, *A, *den, *dden, *diag, *rowc, *ok;
};

__device__ Chunk carve(float* sh, int C, int D, int m) {
  Chunk c;
  float* p = sh;
  c.Xq = p; p += C * D;
  c.Xk = p; p += C * D;
  c.V = p; p += C * D;
  c.G = p; p += C * D;
  c.O = p; p += C * D;
  c.Y = p; p += C * D;
  c.Pq = p; p += C * m;
  c.Pk = p; p += C * m;
  c.Eq = p; p += C * m;
  c.Ek = p; p += C * m;
  c.A = p; p += C * C;
  c.den = p; p += C;
  c.dden = p; p += C;
  c.diag = p; p += C;
  c.rowc = p; p += C;
  c.ok = p;
  return c;
}

// n rows from position c0 of one (b, h) slice into X (n x D); rows that are padding are 0.
template <class T>
__device__ void load_rows(const Args& a, const T* x, const int64_t* st, int b, int h, int c0, int n, const float* ok,
                          float* X) {
  for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) {
    const int t = i / a.D, d = i % a.D;
    X[i] = ok[t] != 0.f ? to_f(x[b * st[0] + h * st[1] + (int64_t)(c0 + t) * st[2] + d]) : 0.f;
  }
}

// E (exp or relu part) and P = ratio (E + eps) of n rows of X (P is 0 on padding). The stabiliser
// is each row's max over features (queries) or ck (keys).
__device__ void chunk_features(const Args& a, const float* X, int n, const float* ok, bool query, float ck,
                               float* diag, float* rowc, float* E, float* P) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float sq = 0.f;
    for (int d = 0; d < a.D; ++d) sq += X[t * a.D + d] * X[t * a.D + d];
    diag[t] = sq * (a.s * a.s * 0.5f);
  }
  for (int i = threadIdx.x; i < n * a.m; i += blockDim.x) {
    const int t = i / a.m, f = i % a.m;
    float acc = 0.f;
    for (int d = 0; d < a.D; ++d) acc += X[t * a.D + d] * a.W[(int64_t)f * a.D + d];
    E[i] = acc * a.s;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float c = ck;
    if (a.relu) {
      c = 0.f;
    } else if (query) {
      c = -INFINITY;
      for (int f = 0; f < a.m; ++f) c = fmaxf(c, E[t * a.m + f]);
    }
    rowc[t] = c;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n * a.m; i += blockDim.x) {
    const int t = i / a.m;
    const float dd = E[i];
    const float e = a.relu ? fmaxf(dd, 0.f) : expf(dd - diag[t] - rowc[t]);
    E[i] = e;
    P[i] = ok[t] != 0.f ? a.ratio * (e + a.eps) : 0.f;
  }
  __syncthreads();
}

// Validity, inputs and features of the chunk at c0; returns its row count.
template <class T>
__device__ int chunk_setup(const Args& a, const Chunk& c, int C, const T* q, const T* k, const T* v, float ck, int b,
                           int h, int c0) {
  const int n = min(C, a.L - c0);
  for (int t = threadIdx.x; t < n; t += blockDim.x) c.ok[t] = valid(a, b, c0 + t) ? 1.f : 0.f;
  __syncthreads();
  load_rows(a, q, a.qs, b, h, c0, n, c.ok, c.Xq);
  load_rows(a, k, a.ks, b, h, c0, n, c.ok, c.Xk);
  load_rows(a, v, a.vs, b, h, c0, n, c.ok, c.V);
  __syncthreads();
  chunk_features(a, c.Xq, n, c.ok, true, ck, c.diag, c.rowc, c.Eq, c.Pq);
  chunk_features(a, c.Xk, n, c.ok, false, ck, c.diag, c.rowc, c.Ek, c.Pk);
  return n;
}

// A[i, j] = phi(q_i) . phi(k_j) for j <= i (lower) or i <= j (upper, with rows from X = Pk, cols Y = Pq).
__device__ void chunk_scores(const Args& a, const float* Prow, const float* Pcol, int n, int C, bool lower, float* A) {
  for (int i = threadIdx.x; i < n * n; i += blockDim.x) {
    const int r = i / n, col = i % n;
    float acc = 0.f;
    if (lower ? col <= r : col >= r)
      for (int f = 0; f < a.m; ++f) acc += Prow[r * a.m + f] * Pcol[col * a.m + f];
    A[r * C + col] = acc;
  }
  __syncthreads();
}

// dO, O of the chunk; dden = -(dO . O) / den, G = dnum = dO / den (0 on padding).
template <class T>
__device__ void chunk_output_grads(const Args& a, const Chunk& c, const T* out, const T* gout, int b, int h, int c0,
                                   int n) {
  load_rows(a, gout, a.gs, b, h, c0, n, c.ok, c.G);
  load_rows(a, out, a.os, b, h, c0, n, c.ok, c.O);
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float acc = 0.f;
    for (int d = 0; d < a.D; ++d) acc += c.G[t * a.D + d] * c.O[t * a.D + d];
    c.dden[t] = c.ok[t] != 0.f ? -acc / c.den[t] : 0.f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) c.G[i] /= c.den[i / a.D];
  __syncthreads();
}

// dx rows (float32, contiguous) from G = dphi * dphi/d(s x.W), already in E (chain applied).
__device__ void chunk_input_grad(const Args& a, const Chunk& c, const float* X, float* E, int n, float* dst) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float gs = 0.f;
    for (int f = 0; f < a.m; ++f) gs += E[t * a.m + f];
    c.rowc[t] = a.relu ? 0.f : gs;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) {
    const int t = i / a.D, d = i % a.D;
    float acc = 0.f;
    for (int f = 0; f < a.m; ++f) acc += E[t * a.m + f] * a.W[(int64_t)f * a.D + d];
    dst[(int64_t)t * a.D + d] = c.ok[t] != 0.f ? a.s * acc - a.s * a.s * c.rowc[t] * X[i] : 0.f;
  }
  __syncthreads();
}

__device__ __forceinline__ float chain(const Args& a, float dphi, float e) {
  return a.relu ? (e > 0.f ? dphi : 0.f) : dphi * a.ratio * e;
}

// The causal denominators of a chunk's rows, phi(q_t) . (z + 1e-6) + sum_{j <= t} A[t, j] (1 on padding),
// into c.den (and into keep when given, for the reverse sweep).
__device__ void chunk_denominators(const Args& a, const Chunk& c, const float* z, int n, int C, float* keep) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    float d = 0.f;
    for (int f = 0; f < a.m; ++f) d += c.Pq[t * a.m + f] * (z[f] + kCausalEps);
    for (int j = 0; j <= t; ++j) d += c.A[t * C + j];
    c.den[t] = c.ok[t] != 0.f ? d : 1.f;
    if (keep != nullptr) keep[t] = c.den[t];
  }
}

// The carried state of a sweep after one chunk of n rows: S[f, d] += sum_j P[j, f] X[j, d] and
// z[f] += sum_j w_j P[j, f] (w = 1 when wts is null). Callers synchronise afterwards.
__device__ void accumulate_state(const Args& a, const float* P, const float* X, const float* wts, int n, float* S,
                                 float* z) {
  for (int i = threadIdx.x; i < a.m * a.D; i += blockDim.x) {
    const int f = i / a.D, d = i % a.D;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc += P[j * a.m + f] * X[j * a.D + d];
    S[i] += acc;
  }
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc += (wts == nullptr ? 1.f : wts[j]) * P[j * a.m + f];
    z[f] += acc;
  }
}

template <class T>
__global__ void causal_fwd_kernel(Args a, int C, const T* q, const T* k, const T* v, const float* ck, float* Sg,
                                  float* zg, T* out) {
  extern __shared__ float sh[];
  const Chunk c = carve(sh, C, a.D, a.m);
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  float* S = Sg + (int64_t)bh * a.m * a.D;
  float* z = zg + (int64_t)bh * a.m;
  for (int i = threadIdx.x; i < a.m * a.D; i += blockDim.x) S[i] = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) z[f] = 0.f;
  __syncthreads();
  for (int c0 = 0; c0 < a.L; c0 += C) {
    const int n = chunk_setup(a, c, C, q, k, v, ck[bh], b, h, c0);
    chunk_scores(a, c.Pq, c.Pk, n, C, true, c.A);
    chunk_denominators(a, c, z, n, C, nullptr);
    for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) {
      const int t = i / a.D, d = i % a.D;
      float acc = 0.f;
      for (int f = 0; f < a.m; ++f) acc += c.Pq[t * a.m + f] * S[(int64_t)f * a.D + d];
      for (int j = 0; j <= t; ++j) acc += c.A[t * C + j] * c.V[j * a.D + d];
      c.Y[i] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) {
      const int t = i / a.D, d = i % a.D;
      out[((int64_t)bh * a.L + c0 + t) * a.D + d] = from_f<T>(c.ok[t] != 0.f ? c.Y[i] / c.den[t] : 0.f);
    }
    accumulate_state(a, c.Pk, c.V, nullptr, n, S, z);
    __syncthreads();
  }
}

template <class T>
__global__ void causal_bwd_kernel(Args a, int C, const T* q, const T* k, const T* v, const T* out, const T* gout,
                                  const float* ck, float* Sg, float* zg, float* Rg, float* rg, float* den_all,
                                  float* dq, float* dk, float* dv) {
  extern __shared__ float sh[];
  const Chunk c = carve(sh, C, a.D, a.m);
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int64_t mD = (int64_t)a.m * a.D;
  float* S = Sg + bh * mD;
  float* z = zg + (int64_t)bh * a.m;
  float* R = Rg + bh * mD;
  float* r = rg + (int64_t)bh * a.m;
  float* den_bh = den_all + (int64_t)bh * a.L;
  const int64_t row0 = (int64_t)bh * a.L;
  for (int i = threadIdx.x; i < mD; i += blockDim.x) S[i] = R[i] = 0.f;
  for (int f = threadIdx.x; f < a.m; f += blockDim.x) z[f] = r[f] = 0.f;
  __syncthreads();
  // Forward sweep: dphi(Q_c) = dnum S^T + dden (z + 1e-6) + tril(dnum V_c^T + dden) phi(K_c).
  for (int c0 = 0; c0 < a.L; c0 += C) {
    const int n = chunk_setup(a, c, C, q, k, v, ck[bh], b, h, c0);
    chunk_scores(a, c.Pq, c.Pk, n, C, true, c.A);
    chunk_denominators(a, c, z, n, C, den_bh + c0);
    __syncthreads();
    chunk_output_grads(a, c, out, gout, b, h, c0, n);
    for (int i = threadIdx.x; i < n * n; i += blockDim.x) {  // A <- M = tril(dnum V^T + dden)
      const int t = i / n, j = i % n;
      float acc = 0.f;
      if (j <= t) {
        for (int d = 0; d < a.D; ++d) acc += c.G[t * a.D + d] * c.V[j * a.D + d];
        acc += c.dden[t];
      }
      c.A[t * C + j] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * a.m; i += blockDim.x) {
      const int t = i / a.m, f = i % a.m;
      float dphi = c.dden[t] * (z[f] + kCausalEps);
      for (int d = 0; d < a.D; ++d) dphi += c.G[t * a.D + d] * S[(int64_t)f * a.D + d];
      for (int j = 0; j <= t; ++j) dphi += c.A[t * C + j] * c.Pk[j * a.m + f];
      c.Eq[i] = chain(a, dphi, c.Eq[i]);
    }
    __syncthreads();
    chunk_input_grad(a, c, c.Xq, c.Eq, n, dq + (row0 + c0) * a.D);
    accumulate_state(a, c.Pk, c.V, nullptr, n, S, z);
    __syncthreads();
  }
  // Reverse sweep: dv_c = phi(K_c) R + triu(phi(K_c) phi(Q_c)^T) dnum,
  // dphi(K_c) = V_c R^T + r + triu(V_c dnum^T + dden^T) phi(Q_c).
  for (int c0 = (a.L - 1) / C * C; c0 >= 0; c0 -= C) {
    const int n = chunk_setup(a, c, C, q, k, v, ck[bh], b, h, c0);
    for (int t = threadIdx.x; t < n; t += blockDim.x) c.den[t] = den_bh[c0 + t];
    __syncthreads();
    chunk_output_grads(a, c, out, gout, b, h, c0, n);
    chunk_scores(a, c.Pk, c.Pq, n, C, false, c.A);
    for (int i = threadIdx.x; i < n * a.D; i += blockDim.x) {
      const int j = i / a.D, d = i % a.D;
      float acc = 0.f;
      for (int f = 0; f < a.m; ++f) acc += c.Pk[j * a.m + f] * R[(int64_t)f * a.D + d];
      for (int t = j; t < n; ++t) acc += c.A[j * C + t] * c.G[t * a.D + d];
      dv[(row0 + c0 + j) * a.D + d] = c.ok[j] != 0.f ? acc : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * n; i += blockDim.x) {  // A <- M^T = triu(V dnum^T + dden^T)
      const int j = i / n, t = i % n;
      float acc = 0.f;
      if (t >= j) {
        for (int d = 0; d < a.D; ++d) acc += c.V[j * a.D + d] * c.G[t * a.D + d];
        acc += c.dden[t];
      }
      c.A[j * C + t] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * a.m; i += blockDim.x) {
      const int j = i / a.m, f = i % a.m;
      float dphi = r[f];
      for (int d = 0; d < a.D; ++d) dphi += c.V[j * a.D + d] * R[(int64_t)f * a.D + d];
      for (int t = j; t < n; ++t) dphi += c.A[j * C + t] * c.Pq[t * a.m + f];
      c.Ek[i] = chain(a, dphi, c.Ek[i]);
    }
    __syncthreads();
    chunk_input_grad(a, c, c.Xk, c.Ek, n, dk + (row0 + c0) * a.D);
    accumulate_state(a, c.Pq, c.G, c.dden, n, R, r);
    __syncthreads();
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

// flags: bit 0 relu kernel, bit 1 causal (one int so the binding's signature stays as it was).
Args make_args(int B, int H, int L, int D, int m, const int64_t* strides, uintptr_t pad, uintptr_t W, int flags,
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
  a.relu = (flags & 1) != 0;
  a.causal = (flags & 2) != 0;
  a.ratio = a.relu ? 1.f : 1.f / sqrtf((float)m);
  a.eps = eps;
  return a;
}

}  // namespace

// strides: q, k, v, out, grad_out (3 each; out / grad_out unused in the forward).
// ws_C: B*H*m*D floats, ws_z: B*H*m floats.
void performer_fwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t W, uintptr_t out, uintptr_t ck,
                   uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z, int B, int H, int L, int D, int m,
                   const int64_t* strides, int flags, float eps, uintptr_t stream_handle) {
  Args a = make_args(B, H, L, D, m, strides, pad, W, flags, eps);
  const unsigned bh = grid_x((int64_t)B * H, "performer_fwd_cuda");
  DeviceGuard guard(q, "performer_fwd_cuda");
  cudaStream_t stream = (cudaStream_t)stream_handle;
  const size_t sh_feat = (kThreads + 2 * (size_t)m) * sizeof(float);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    allow_dynamic_smem(key_max_kernel<T>, sh_feat, "performer_fwd_cuda");
    key_max_kernel<T><<<bh, kThreads, sh_feat, stream>>>(a, (const T*)k, (float*)ck);
    if (a.causal) {  // ws_C, ws_z hold each block's prefix state S, z
      const int C = causal_chunk(D, m);
      causal_fwd_kernel<T><<<bh, kThreads, causal_smem_floats(C, D, m) * sizeof(float), stream>>>(
          a, C, (const T*)q, (const T*)k, (const T*)v, (const float*)ck, (float*)ws_C, (float*)ws_z, (T*)out);
      return;
    }
    for_grid_y(m, [&](int64_t y0, unsigned ny) {
      key_state_kernel<T><<<dim3(bh, ny), kThreads, 0, stream>>>(a, (int)y0, (const T*)k, (const T*)v,
                                                                (const float*)ck, (float*)ws_C, (float*)ws_z);
    });
    allow_dynamic_smem(query_out_kernel<T>, sh_feat, "performer_fwd_cuda");
    for_grid_y(L, [&](int64_t y0, unsigned ny) {
      query_out_kernel<T><<<dim3(bh, ny), kThreads, sh_feat, stream>>>(a, (int)y0, (const T*)q, (const float*)ws_C,
                                                                      (const float*)ws_z, (T*)out);
    });
  });
  check(cudaGetLastError());
}

// ws: C (B*H*m*D), z (B*H*m), dC (B*H*m*D), dz (B*H*m), den (B*H*L), cq (B*H*L), ck (B*H) floats.
void performer_bwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t W, uintptr_t out, uintptr_t gout,
                   uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z,
                   uintptr_t ws_dC, uintptr_t ws_dz, uintptr_t ws_den, uintptr_t ws_cq, uintptr_t ws_ck, int B, int H,
                   int L, int D, int m, const int64_t* strides, int flags, float eps, uintptr_t stream_handle) {
  Args a = make_args(B, H, L, D, m, strides, pad, W, flags, eps);
  const unsigned bh = grid_x((int64_t)B * H, "performer_bwd_cuda");
  DeviceGuard guard(q, "performer_bwd_cuda");
  cudaStream_t stream = (cudaStream_t)stream_handle;
  const size_t sh_feat = (kThreads + 2 * (size_t)m) * sizeof(float);
  const size_t sh_bwd = (2 * kThreads + 2 * (size_t)m) * sizeof(float);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    allow_dynamic_smem(key_max_kernel<T>, sh_feat, "performer_bwd_cuda");
    key_max_kernel<T><<<bh, kThreads, sh_feat, stream>>>(a, (const T*)k, (float*)ws_ck);
    if (a.causal) {  // prefix states S, z in ws_C, ws_z; reverse-sweep states R, r in ws_dC, ws_dz
      const int C = causal_chunk(D, m);
      causal_bwd_kernel<T><<<bh, kThreads, causal_smem_floats(C, D, m) * sizeof(float), stream>>>(
          a, C, (const T*)q, (const T*)k, (const T*)v, (const T*)out, (const T*)gout, (const float*)ws_ck,
          (float*)ws_C, (float*)ws_z, (float*)ws_dC, (float*)ws_dz, (float*)ws_den, (float*)dq, (float*)dk,
          (float*)dv);
      return;
    }
    for_grid_y(m, [&](int64_t y0, unsigned ny) {
      key_state_kernel<T><<<dim3(bh, ny), kThreads, 0, stream>>>(a, (int)y0, (const T*)k, (const T*)v,
                                                                (const float*)ws_ck, (float*)ws_C, (float*)ws_z);
    });
    allow_dynamic_smem(bwd_query_kernel<T>, sh_bwd, "performer_bwd_cuda");
    allow_dynamic_smem(bwd_key_kernel<T>, sh_bwd, "performer_bwd_cuda");
    for_grid_y(L, [&](int64_t y0, unsigned ny) {
      bwd_query_kernel<T><<<dim3(bh, ny), kThreads, sh_bwd, stream>>>(
          a, (int)y0, (const T*)q, (const T*)out, (const T*)gout, (const float*)ws_C, (const float*)ws_z,
          (float*)dq, (float*)ws_den, (float*)ws_cq);
    });
    for_grid_y(m, [&](int64_t y0, unsigned ny) {
      bwd_dc_kernel<T><<<dim3(bh, ny), kThreads, 0, stream>>>(a, (int)y0, (const T*)q, (const T*)out,
                                                             (const T*)gout, (const float*)ws_den,
                                                             (const float*)ws_cq, (float*)ws_dC, (float*)ws_dz);
    });
    for_grid_y(L, [&](int64_t y0, unsigned ny) {
      bwd_key_kernel<T><<<dim3(bh, ny), kThreads, sh_bwd, stream>>>(a, (int)y0, (const T*)k, (const T*)v,
                                                                   (const float*)ws_ck, (const float*)ws_dC,
                                                                   (const float*)ws_dz, (float*)dk, (float*)dv);
    });
  });
  check(cudaGetLastError());
}

}  // namespace biogen::cuda
