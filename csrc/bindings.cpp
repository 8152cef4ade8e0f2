// The one pybind11 module. Kernels take raw pointers (tensor.data_ptr()), sizes and strides, so the
// extension never links libtorch; biogen/ops/*.py checks tensors, allocates outputs and registers
// each kernel as a torch custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "biogen/common.h"
#include "biogen/cpu_dispatch.h"

namespace py = pybind11;

#ifndef BIOGEN_VERSION
#define BIOGEN_VERSION ""
#endif

#ifdef BIOGEN_WITH_CUDA
namespace biogen::cuda {
// Defined in csrc/cuda/runtime.cu: (device count, error string if the runtime could not be queried).
std::pair<int, std::string> device_count();
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
  // --- kernels: one block per op, declared in their csrc/cpu and csrc/cuda files ---

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
