// The one pybind11 module. Kernels take raw pointers (tensor.data_ptr()), sizes and strides, so the
// extension never links libtorch; biogen/ops/*.py checks tensors, allocates outputs and registers
// each kernel as a torch custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

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

#ifndef BIOGEN_VERSION
#define BIOGEN_VERSION ""
#endif

#ifdef BIOGEN_WITH_CUDA
namespace biogen::cuda {
// Defined in csrc/cuda/runtime.cu: (device count, error string if the runtime could not be queried).
std::pair<int, std::string> device_count();
}  // namespace biogen::cuda
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
                    int pred, double w, double clip, double ratio, double max_value, int nthreads))
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
                  int pred, double w, double clip, int mode, uintptr_t stream);
}  // namespace biogen::cuda
#endif

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
                               int nthreads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(sampler_step, dtype, x, mo, mu, px0, noise, prev, x0, alpha, sigma, c_sample, c_x0, c_eps,
                    c_noise, c_prev_x0, B, N, pred, w, clip, ratio, max_value, nthreads);
  });
#ifdef BIOGEN_WITH_CUDA
  m.def("group_norm_fwd_cuda", &biogen::cuda::group_norm_fwd);
  m.def("group_norm_bwd_cuda", &biogen::cuda::group_norm_bwd);
  m.def("sampler_step_cuda", &biogen::cuda::sampler_step);
#endif
  // end diffusion
}
