// CUDA runtime queries for build_info(). The runtime is linked statically, so these work (and return
// an error string) on machines without a driver.
#include <cuda_runtime.h>

#include <string>
#include <utility>

namespace biogen::cuda {
std::pair<int, std::string> device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return {0, std::string(cudaGetErrorString(err))};
  }
  return {n, std::string()};
}
}  // namespace biogen::cuda
