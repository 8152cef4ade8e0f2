#include "biogen/cpu_dispatch.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace biogen {

CpuCap cpu_capability_hardware() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return __builtin_cpu_supports("avx512bf16") ? CpuCap::avx512_bf16 : CpuCap::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuCap::avx2;
#endif
  return CpuCap::base;
}

static CpuCap choose() {
  const CpuCap hw = cpu_capability_hardware();
  const char* env = std::getenv("BIOGEN_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return hw;
  CpuCap want;
  if (!std::strcmp(env, "base")) want = CpuCap::base;
  else if (!std::strcmp(env, "avx2")) want = CpuCap::avx2;
  else if (!std::strcmp(env, "avx512")) want = CpuCap::avx512;
  else if (!std::strcmp(env, "avx512_bf16")) want = CpuCap::avx512_bf16;
  else throw std::invalid_argument("biogen: BIOGEN_CPU_CAPABILITY must be base, avx2, avx512 or avx512_bf16");
  // Asking for more than the CPU has would crash with an illegal instruction: cap it.
  return (int)want <= (int)hw ? want : hw;
}

CpuCap cpu_capability() {
  static const CpuCap cap = choose();
  return cap;
}

std::string cpu_capability_name(CpuCap c) {
  switch (c) {
    case CpuCap::avx512_bf16: return "avx512_bf16";
    case CpuCap::avx512: return "avx512";
    case CpuCap::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace biogen
