// Host-side launch helpers shared by the CUDA launchers (csrc/cuda/*.cu).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace biogen::cuda {

// Grid dimensions y and z are limited to 65,535 blocks (x to 2^31 - 1).
constexpr int64_t kMaxGridY = 65535;

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("biogen: ") + op + ": " + what + " failed: " + cudaGetErrorString(err));
  }
}

inline unsigned grid_x(int64_t n, const char* op) {
  if (n <= 0 || n > INT_MAX)
    throw std::invalid_argument(std::string("biogen: ") + op + ": " + std::to_string(n) +
                                " blocks along grid x; must be 1 to 2^31 - 1");
  return unsigned(n);
}

// Calls launch(y0, ny) for consecutive slices [y0, y0 + ny) of n rows along grid y, each at most
// kMaxGridY, so a kernel indexing row blockIdx.y + y0 covers any n.
template <class F>
void for_grid_y(int64_t n, F&& launch) {
  for (int64_t y0 = 0; y0 < n; y0 += kMaxGridY) launch(y0, unsigned(std::min(kMaxGridY, n - y0)));
}

// A kernel needing more than the 48 KB of dynamic shared memory a block gets by default must opt in
// (up to the device's limit: 99 KB on sm_86/sm_89/sm_120, 163 KB on sm_80, 227 KB on sm_90/sm_100).
template <class Kernel>
void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* op) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), op,
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

// Kernels launch on the device that holds the tensors (the pointer's device), whatever the
// caller's current device is; the previous device is restored on exit.
class DeviceGuard {
 public:
  DeviceGuard(uintptr_t ptr, const char* op) {
    cudaPointerAttributes attr{};
    check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), op, "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw std::invalid_argument(std::string("biogen: ") + op + ": input is not CUDA device memory");
    int current = 0;
    check_cuda(cudaGetDevice(&current), op, "cudaGetDevice");
    if (current != attr.device) {
      check_cuda(cudaSetDevice(attr.device), op, "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace biogen::cuda
