// The one pybind11 module. Kernels take raw pointers (tensor.data_ptr()), sizes and strides, so the
// extension never links libtorch; biogen/ops/*.py checks tensors, allocates outputs and registers
// each kernel as a torch custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
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
                   (int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int, int, int,
                    int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                    int, float, int))
BIOGEN_CPU_DECLARE(void, performer_bwd,
                   (int, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                    uintptr_t, uintptr_t, int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t,
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
namespace biogen::cuda {
// Defined in csrc/cuda/runtime.cu: (device count, error string if the runtime could not be queried).
std::pair<int, std::string> device_count();
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
  // Performer FAVOR+ linear attention (biogen/ops/performer.py)
  m.def("performer_fwd_cpu", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                uintptr_t ck, uintptr_t pad, int B, int H, int L, int D, int m_, int64_t qsb,
                                int64_t qsh, int64_t qsl, int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb,
                                int64_t vsh, int64_t vsl, int causal, int relu, float eps, int threads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(performer_fwd, dtype, q, k, v, proj, out, ck, pad, B, H, L, D, m_, qsb, qsh, qsl, ksb, ksh, ksl,
                    vsb, vsh, vsl, causal, relu, eps, threads);
  });
  m.def("performer_bwd_cpu", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                uintptr_t gout, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad, int B,
                                int H, int L, int D, int m_, int64_t qsb, int64_t qsh, int64_t qsl, int64_t ksb,
                                int64_t ksh, int64_t ksl, int64_t vsb, int64_t vsh, int64_t vsl, int64_t osb,
                                int64_t osh, int64_t osl, int64_t gsb, int64_t gsh, int64_t gsl, int causal,
                                int relu, float eps, int threads) {
    py::gil_scoped_release nogil;
    BIOGEN_CPU_CALL(performer_bwd, dtype, q, k, v, proj, out, gout, dq, dk, dv, pad, B, H, L, D, m_, qsb, qsh, qsl,
                    ksb, ksh, ksl, vsb, vsh, vsl, osb, osh, osl, gsb, gsh, gsl, causal, relu, eps, threads);
  });
#ifdef BIOGEN_WITH_CUDA
  // strides: 15 values, (batch, head, row) for q, k, v, out, grad_out; workspaces allocated by Python.
  m.def("performer_fwd_cuda", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                 uintptr_t ck, uintptr_t pad, uintptr_t ws_C, uintptr_t ws_z, int B, int H, int L,
                                 int D, int m_, std::vector<int64_t> strides, int relu, float eps, uintptr_t stream) {
    BIOGEN_CHECK(strides.size() == 15, "performer_fwd_cuda needs 15 strides");
    py::gil_scoped_release nogil;
    biogen::cuda::performer_fwd(dtype, q, k, v, proj, out, ck, pad, ws_C, ws_z, B, H, L, D, m_, strides.data(), relu,
                                eps, stream);
  });
  m.def("performer_bwd_cuda", [](int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t proj, uintptr_t out,
                                 uintptr_t gout, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t pad,
                                 uintptr_t ws_C, uintptr_t ws_z, uintptr_t ws_dC, uintptr_t ws_dz, uintptr_t ws_den,
                                 uintptr_t ws_cq, uintptr_t ws_ck, int B, int H, int L, int D, int m_,
                                 std::vector<int64_t> strides, int relu, float eps, uintptr_t stream) {
    BIOGEN_CHECK(strides.size() == 15, "performer_bwd_cuda needs 15 strides");
    py::gil_scoped_release nogil;
    biogen::cuda::performer_bwd(dtype, q, k, v, proj, out, gout, dq, dk, dv, pad, ws_C, ws_z, ws_dC, ws_dz, ws_den,
                                ws_cq, ws_ck, B, H, L, D, m_, strides.data(), relu, eps, stream);
  });
#endif
}
