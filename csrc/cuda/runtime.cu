// CUDA runtime queries for build_info() and backend selection. The runtime is linked statically, so
// these work on machines without a driver: every query returns an error string instead of throwing,
// so that Python can fall back to another backend with a reason.
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "biogen/cuda_status.h"

namespace biogen::cuda {
namespace {

// Launched never: cudaFuncGetAttributes on it tells whether this extension holds a kernel image
// (SASS for the device's architecture, or PTX the driver can JIT) for a given device.
__global__ void probe_kernel() {}

std::string error_string(cudaError_t err) {
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace

std::pair<int, std::string> device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) return {0, error_string(err)};
  return {n, std::string()};
}

Status status(int device) {
  Status s;
  s.runtime_version = CUDART_VERSION;
  // cudaDriverGetVersion returns 0 (and success) when no driver is installed.
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  auto [n, err] = device_count();
  s.device_count = n;
  s.error = err;
  if (!err.empty() || device < 0 || device >= n) return s;
  int previous = -1;
  cudaError_t e = cudaGetDevice(&previous);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&s.major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&s.minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&s.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) {
    s.error = error_string(e);
    return s;
  }
  // The image check needs the device's context current; restore the caller's device afterwards.
  e = cudaSetDevice(device);
  if (e == cudaSuccess) {
    cudaFuncAttributes attr{};
    e = cudaFuncGetAttributes(&attr, probe_kernel);
    if (e == cudaSuccess) {
      s.ptx_version = attr.ptxVersion;
      s.binary_version = attr.binaryVersion;
    }
  }
  if (e != cudaSuccess) s.image_error = error_string(e);
  if (previous >= 0) cudaSetDevice(previous);
  return s;
}

}  // namespace biogen::cuda
