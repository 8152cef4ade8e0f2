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
}
