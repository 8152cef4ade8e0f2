// Every file in csrc/cpu/ is compiled once per instruction set (base, avx2, avx512) into namespace
// BIOGEN_CPU_NS; the binding calls the best one the running CPU supports (or the one forced with
// BIOGEN_CPU_CAPABILITY=base|avx2|avx512|avx512_bf16, which the tests use to cover every path on one
// machine). avx512_bf16 runs the avx512 build and lets kernels take bfloat16 inputs' products with
// AVX512-BF16 dot products (functions compiled for that target inside the avx512 build).
#pragma once
#include <string>

namespace biogen {
enum class CpuCap : int { base = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };
CpuCap cpu_capability();            // chosen at first call, cached
CpuCap cpu_capability_hardware();   // best the CPU supports among those compiled
std::string cpu_capability_name(CpuCap c);
}  // namespace biogen

// Declare a kernel function in each per-ISA namespace.
#if defined(__x86_64__) || defined(_M_X64)
#define BIOGEN_CPU_DECLARE(ret, name, params) \
  namespace biogen_cpu_base { ret name params; } \
  namespace biogen_cpu_avx2 { ret name params; } \
  namespace biogen_cpu_avx512 { ret name params; }
#define BIOGEN_CPU_CALL(name, ...)                                            \
  (::biogen::cpu_capability() >= ::biogen::CpuCap::avx512 ? biogen_cpu_avx512::name(__VA_ARGS__) \
   : ::biogen::cpu_capability() == ::biogen::CpuCap::avx2 ? biogen_cpu_avx2::name(__VA_ARGS__)   \
                                                          : biogen_cpu_base::name(__VA_ARGS__))
#else
#define BIOGEN_CPU_DECLARE(ret, name, params) namespace biogen_cpu_base { ret name params; }
#define BIOGEN_CPU_CALL(name, ...) biogen_cpu_base::name(__VA_ARGS__)
#endif
