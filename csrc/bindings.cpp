// The one pybind11 module. Kernels take raw pointers (tensor.data_ptr()), sizes and strides, so the
// extension never links libtorch; biogen/ops/*.py checks tensors, allocates outputs and registers
// each kernel as a torch custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "biogen/common.h"
#include "biogen/cpu_dispatch.h"
#ifdef BIOGEN_WITH_CUDA
#include "biogen/masked_attention_cuda.h"
#endif

namespace py = pybind11;

// --- sc binning (csrc/cpu/binning.cpp) ---
BIOGEN_CPU_DECLARE(void, bin_csr,
                   (const int64_t* indptr, const void* data, int is_f64, int64_t n_rows, const double* q,
                    int64_t n_edges, uint64_t seed, int64_t cell_offset, int32_t* out, int num_threads))
// --- Performer FAVOR+ linear attention (csrc/cpu/performer.cpp) ---
BIOGEN_CPU_DECLARE(void, performer_fwd,
                   (int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, int, int,
                    int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                    int, float, int))
BIOGEN_CPU_DECLARE(void, performer_bwd,
                   (int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                    uintptr_t, uintptr_t, uintptr_t, int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                    int, float, int))

#ifndef BIOGEN_VERSION
#define BIOGEN_VERSION ""
#endif

#ifdef BIOGEN_WITH_CUDA
namespace biogen::cuda {
// Performer FAVOR+ attention (csrc/cuda/performer.cu)
void performer_fwd(int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                   uintptr_t, int, int, int, int, int, const int64_t*, int, float, uintptr_t);
void performer_bwd(int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                   uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                   int, int, int, int, int, const int64_t*, int, float, uintptr_t);
}  // namespace biogen::cuda
#endif

#ifdef BIOGEN_WITH_CUDA
#include "biogen/cuda_status.h"
#endif

// --- diffusion: group_norm_silu and sampler_step (csrc/cpu/group_norm.cpp, csrc/cpu/sampler.cpp) ---
BIOGEN_CPU_DECLARE(void, group_norm_fwd,
                   (int dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift, uintptr_t y,
                    uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last,
                    double eps, int act, int nthreads))
BIOGEN_CPU_DECLARE(void, group_norm_bwd,
                   (int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale,
                    uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t sum_dz,
                    uintptr_t sum_dzx, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last, int act,
                    int nthreads))
BIOGEN_CPU_DECLARE(void, sampler_step,
                   (int dtype, uintptr_t x, uintptr_t m, uintptr_t mu, uintptr_t px0, uintptr_t noise,
                    uintptr_t prev, uintptr_t x0, uintptr_t alpha, uintptr_t sigma, uintptr_t c_sample,
                    uintptr_t c_x0, uintptr_t c_eps, uintptr_t c_noise, uintptr_t c_prev_x0, int64_t B, int64_t N,
                    int pred, double w, double clip, double ratio, double max_value, int clipped_eps,
                    int nthreads))
#ifdef BIOGEN_WITH_CUDA
namespace biogen::cuda {
void group_norm_fwd(int dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift, uintptr_t y,
                    uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last,
                    double eps, int act, uintptr_t stream);
void group_norm_bwd(int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale,
                    uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t sum_dz,
                    uintptr_t sum_dzx, int64_t B, int64_t C, int64_t S, int64_t G, int channels_last, int act,
                    uintptr_t stream);
// mode 0: whole step; 1: write the float32 x0 to x0f only; 2: finish from x0f with per-sample thresholds th
void sampler_step(int dtype, uintptr_t x, uintptr_t m, uintptr_t mu, uintptr_t px0, uintptr_t noise, uintptr_t prev,
                  uintptr_t x0, uintptr_t x0f, uintptr_t th, uintptr_t alpha, uintptr_t sigma, uintptr_t c_sample,
                  uintptr_t c_x0, uintptr_t c_eps, uintptr_t c_noise, uintptr_t c_prev_x0, int64_t B, int64_t N,
                  int pred, double w, double clip, int mode, int clipped_eps, uintptr_t stream);
}  // namespace biogen::cuda
#endif
// --- masked gene attention (SPEC 1.1): csrc/cpu/masked_attention.cpp
BIOGEN_CPU_DECLARE(void, masked_attention_fwd_cpu,
                   (int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t pad,
                    uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sqb, int64_t sqh,
                    int64_t sql, int64_t skb, int64_t skh, int64_t skl, int64_t svb, int64_t svh, int64_t svl,
                    double scale, int nthreads))
BIOGEN_CPU_DECLARE(void, masked_attention_bwd_cpu,
                   (int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t dout, uintptr_t lse,
                    uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, uintptr_t known, int64_t B,
                    int64_t H, int64_t L, int64_t D, int64_t sqb, int64_t sqh, int64_t sql, int64_t skb,
                    int64_t skh, int64_t skl, int64_t svb, int64_t svh, int64_t svl, int64_t sob, int64_t soh,
                    int64_t sol, int64_t sdb, int64_t sdh, int64_t sdl, double scale, int nthreads))

namespace {
// Checks shared by forward and backward; the Python side has already checked dtypes and shapes, these
// guard the raw-pointer contract itself.
void check_attention_args(uintptr_t q, int64_t B, int64_t H, int64_t L, int64_t D, int nthreads,
                          std::initializer_list<int64_t> strides) {
  BIOGEN_CHECK(q != 0, "masked_attention: null tensor pointer");
  BIOGEN_CHECK(B > 0 && H > 0 && L > 0 && D > 0, "masked_attention: empty dimension");
  BIOGEN_CHECK(D <= 128, "masked_attention supports head dimension at most 128, got " + std::to_string(D));
  BIOGEN_CHECK(L < (int64_t{1} << 31), "masked_attention: length must be below 2^31");
  BIOGEN_CHECK(nthreads >= 1, "masked_attention: num_threads must be >= 1");
  for (int64_t s : strides) BIOGEN_CHECK(s >= 0, "masked_attention: negative strides are not supported");
}
}  // namespace

static py::dict build_info() {
  py::dict d;
  d["version"] = BIOGEN_VERSION;
  d["compiler"] = BIOGEN_COMPILER;
  d["cpu_capabilities_compiled"] = std::string(BIOGEN_CPU_CAPS);
  d["cpu_capability_hardware"] = biogen::cpu_capability_name(biogen::cpu_capability_hardware());
  d["cpu_capability"] = biogen::cpu_capability_name(biogen::cpu_capability());
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#ifdef BIOGEN_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(BIOGEN_CUDA_ARCHS);
  d["cuda_version"] = std::string(BIOGEN_CUDA_VERSION);
  auto [n, err] = biogen::cuda::device_count();
  d["cuda_device_count"] = n;
  d["cuda_runtime_error"] = err;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_version"] = std::string();
  d["cuda_device_count"] = 0;
  d["cuda_runtime_error"] = std::string("built without a CUDA compiler");
#endif
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "biogen compiled kernels (CPU: OpenMP + SIMD; CUDA where built)";
  m.def("build_info", &build_info, "What this extension was compiled with and what it finds at run time.");
#ifdef BIOGEN_WITH_CUDA
  m.def(
      "cuda_status",
      [](int device) {
        biogen::cuda::Status s;
        {
          py::gil_scoped_release nogil;  // a first query initialises the driver: slow
          s = biogen::cuda::status(device);
        }
        py::dict d;
        d["runtime_version"] = s.runtime_version;
        d["driver_version"] = s.driver_version;
        d["device_count"] = s.device_count;
        d["error"] = s.error;
        d["major"] = s.major;
        d["minor"] = s.minor;
        d["smem_optin"] = s.smem_optin;
        d["ptx_version"] = s.ptx_version;
        d["binary_version"] = s.binary_version;
        d["image_error"] = s.image_error;
        return d;
      },
      py::arg("device"),
      "What the CUDA runtime finds for one device index (driver, device count, compute capability, "
      "whether a kernel image of this extension loads there); never raises.");
#endif
  // --- kernels: one block per op, declared in their csrc/cpu and csrc/cuda files ---

  // masked gene attention, CUDA (csrc/cuda/masked_attention.cu). Launches are asynchronous on the
  // given stream; the GIL is released while the host side runs.
#ifdef BIOGEN_WITH_CUDA
  m.def("masked_attention_fwd_cuda", &biogen::cuda::masked_attention_fwd, py::call_guard<py::gil_scoped_release>(),
        "Masked gene attention forward on CUDA: writes out (B,H,L,D) and lse (B,H,L) float32.");
  m.def("masked_attention_bwd_cuda", &biogen::cuda::masked_attention_bwd, py::call_guard<py::gil_scoped_release>(),
        "Masked gene attention backward on CUDA: writes dq, dk, dv (B,H,L,D) float32.");
#endif
  // --- sc binning: scGPT per-cell quantile binning of a CSR matrix (biogen/sc/binning.py) ---
  m.def(
      "bin_csr",
      [](uintptr_t indptr, uintptr_t data, int is_f64, int64_t n_rows, uintptr_t q, int64_t n_edges, uint64_t seed,
         int64_t cell_offset, uintptr_t out, int num_threads) {
        BIOGEN_CHECK(n_rows >= 0 && n_edges >= 1, "bin_csr: n_rows must be >= 0 and n_edges >= 1");
        py::gil_scoped_release release;
        BIOGEN_CPU_CALL(bin_csr, reinterpret_cast<const int64_t*>(indptr), reinterpret_cast<const void*>(data),
                        is_f64, n_rows, reinterpret_cast<const double*>(q), n_edges, seed, cell_offset,
                        reinterpret_cast<int32_t*>(out), num_threads);
      },
      py::arg("indptr"), py::arg("data"), py::arg("is_f64"), py::arg("n_rows"), py::arg("q"), py::arg("n_edges"),
      py::arg("seed"), py::arg("cell_offset"), py::arg("out"), py::arg("num_threads"),
      "scGPT binning of CSR rows (raw pointers: int64 indptr, float32/float64 data, float64 quantile levels, "
      "int32 out). Checked and called by biogen.sc.binning.bin_values.");
  // diffusion: group_norm_silu (GroupNorm + affine + FiLM + SiLU) and sampler_step
  m.def("group_norm_fwd_cpu", [](int dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale, uintptr_t shift,
                                 uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S,
                                 int64_t G, int cl, double eps, int act, int nthreads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(group_norm_fwd, dtype, x, w, b, scale, shift, y, mean, rstd, B, C, S, G, cl, eps, act, nthreads);
  });
  m.def("group_norm_bwd_cpu", [](int dtype, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t scale,
                                 uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t sum_dz,
                                 uintptr_t sum_dzx, int64_t B, int64_t C, int64_t S, int64_t G, int cl, int act,
                                 int nthreads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(group_norm_bwd, dtype, dy, x, w, b, scale, shift, mean, rstd, dx, sum_dz, sum_dzx, B, C, S, G,
                    cl, act, nthreads);
  });
  m.def("sampler_step_cpu", [](int dtype, uintptr_t x, uintptr_t mo, uintptr_t mu, uintptr_t px0, uintptr_t noise,
                               uintptr_t prev, uintptr_t x0, uintptr_t alpha, uintptr_t sigma, uintptr_t c_sample,
                               uintptr_t c_x0, uintptr_t c_eps, uintptr_t c_noise, uintptr_t c_prev_x0, int64_t B,
                               int64_t N, int pred, double w, double clip, double ratio, double max_value,
                               int clipped_eps, int nthreads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(sampler_step, dtype, x, mo, mu, px0, noise, prev, x0, alpha, sigma, c_sample, c_x0, c_eps,
                    c_noise, c_prev_x0, B, N, pred, w, clip, ratio, max_value, clipped_eps, nthreads);
  });
#ifdef BIOGEN_WITH_CUDA
  m.def("group_norm_fwd_cuda", &biogen::cuda::group_norm_fwd);
  m.def("group_norm_bwd_cuda", &biogen::cuda::group_norm_bwd);
  m.def("sampler_step_cuda", &biogen::cuda::sampler_step);
#endif
  // end diffusion
  // Performer FAVOR+ linear attention (biogen/ops/performer.py)
  m.def("performer_fwd_cpu", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                uintptr_t ck, uintptr_t state, uintptr_t pad, int B, int H, int L, int D, int m_,
                                int64_t qsb,
                                int64_t qsh, int64_t qsl, int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb,
                                int64_t vsh, int64_t vsl, int causal, int relu, float eps, int threads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(performer_fwd, dtype, q, k, v, proj, out, ck, state, pad, B, H, L, D, m_, qsb, qsh, qsl, ksb, ksh, ksl,
                    vsb, vsh, vsl, causal, relu, eps, threads);
  });
  m.def("performer_bwd_cpu", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                uintptr_t gout, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad,
                                uintptr_t state, int B,
                                int H, int L, int D, int m_, int64_t qsb, int64_t qsh, int64_t qsl, int64_t ksb,
                                int64_t ksh, int64_t ksl, int64_t vsb, int64_t vsh, int64_t vsl, int64_t osb,
                                int64_t osh, int64_t osl, int64_t gsb, int64_t gsh, int64_t gsl, int causal,
                                int relu, float eps, int threads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(performer_bwd, dtype, q, k, v, proj, out, gout, dq, dk, dv, pad, state, B, H, L, D, m_, qsb, qsh, qsl,
                    ksb, ksh, ksl, vsb, vsh, vsl, osb, osh, osl, gsb, gsh, gsl, causal, relu, eps, threads);
  });
#ifdef BIOGEN_WITH_CUDA
  // strides: 15 values, (batch, head, row) for q, k, v, out, grad_out; workspaces allocated by Python.
  m.def("performer_fwd_cuda", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                 uintptr_t ck, uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z, int B, int H, int L,
                                 int D, int m_, std::vector<int64_t> strides, int flags, float eps, uintptr_t stream) {
    BIOGEN_CHECK(strides.size() == 15, "performer_fwd_cuda needs 15 strides");
    py::gil_scoped_release nogil;
    biogen::cuda::performer_fwd(dtype, q, k, v, proj, out, ck, pad, ws_C, ws_z, B, H, L, D, m_, strides.data(), flags,
                                eps, stream);
  });
  m.def("performer_bwd_cuda", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                 uintptr_t gout, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad,
                                 uintptr_t ws_C, uintptr_t ws_z, uintptr_t ws_dC, uintptr_t ws_dz, uintptr_t ws_den,
                                 uintptr_t ws_cq, uintptr_t ws_ck, int B, int H, int L, int D, int m_,
                                 std::vector<int64_t> strides, int flags, float eps, uintptr_t stream) {
    BIOGEN_CHECK(strides.size() == 15, "performer_bwd_cuda needs 15 strides");
    py::gil_scoped_release nogil;
    biogen::cuda::performer_bwd(dtype, q, k, v, proj, out, gout, dq, dk, dv, pad, ws_C, ws_z, ws_dC, ws_dz, ws_den,
                                ws_cq, ws_ck, B, H, L, D, m_, strides.data(), flags, eps, stream);
  });
#endif
  // masked gene attention (SPEC 1.1): see biogen/ops/masked_attention.py (_fwd_native, _bwd_native)
  m.def(
      "masked_attention_fwd_cpu",
      [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t pad,
         uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sqb, int64_t sqh, int64_t sql,
         int64_t skb, int64_t skh, int64_t skl, int64_t svb, int64_t svh, int64_t svl, double scale,
         int nthreads) {
        check_attention_args(q, B, H, L, D, nthreads, {sqb, sqh, sql, skb, skh, skl, svb, svh, svl});
        BIOGEN_CHECK(k != 0 && v != 0 && out != 0 && lse != 0, "masked_attention: null tensor pointer");
        BIOGEN_CPU_CALL(masked_attention_fwd_cpu, dtype, q, k, v, out, lse, pad, known, B, H, L, D, sqb, sqh,
                        sql, skb, skh, skl, svb, svh, svl, scale, nthreads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Masked gene attention forward: writes out (B,H,L,D) in the input dtype and lse (B,H,L) float32.");
  m.def(
      "masked_attention_bwd_cpu",
      [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t dout, uintptr_t lse,
         uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, uintptr_t known, int64_t B, int64_t H,
         int64_t L, int64_t D, int64_t sqb, int64_t sqh, int64_t sql, int64_t skb, int64_t skh, int64_t skl,
         int64_t svb, int64_t svh, int64_t svl, int64_t sob, int64_t soh, int64_t sol, int64_t sdb, int64_t sdh,
         int64_t sdl, double scale, int nthreads) {
        check_attention_args(q, B, H, L, D, nthreads,
                             {sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sdb, sdh, sdl});
        BIOGEN_CHECK(k != 0 && v != 0 && o != 0 && dout != 0 && lse != 0 && dq != 0 && dk != 0 && dv != 0,
                     "masked_attention: null tensor pointer");
        BIOGEN_CPU_CALL(masked_attention_bwd_cpu, dtype, q, k, v, o, dout, lse, dq, dk, dv, pad, known, B, H, L,
                        D, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sdb, sdh, sdl, scale,
                        nthreads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Masked gene attention backward: writes float32 dq, dk, dv (B,H,L,D) in full.");
}
