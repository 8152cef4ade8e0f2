// What the CUDA runtime finds at run time, declared without CUDA headers so bindings.cpp compiles
// with the host compiler. Defined in csrc/cuda/runtime.cu; nothing here throws.
#pragma once
#include <string>
#include <utility>

namespace biogen::cuda {

struct Status {
  int runtime_version = 0;  // CUDART_VERSION this extension was compiled with (e.g. 13000)
  int driver_version = 0;   // cudaDriverGetVersion: the newest CUDA the driver supports; 0 = no driver
  int device_count = 0;
  std::string error;        // cudaGetDeviceCount's error ("" = none)
  int major = -1, minor = -1;  // the queried device's compute capability (-1: not queried)
  int smem_optin = 0;          // max shared memory per block with opt-in, bytes
  int ptx_version = 0, binary_version = 0;  // of the kernel image the device would load
  std::string image_error;     // cudaFuncGetAttributes on a probe kernel ("" = an image loads)
};

// (device count, error string if the runtime could not be queried).
std::pair<int, std::string> device_count();
// Everything above for one device index; device fields stay -1 / 0 if it does not exist.
Status status(int device);

}  // namespace biogen::cuda
