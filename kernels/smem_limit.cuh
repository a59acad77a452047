// A kernel's dynamic shared memory limit, raised for every host thread at once (CUDA C++ only).
//
// cudaFuncAttributeMaxDynamicSharedMemorySize is one value per function and device, shared by every host thread. A
// launcher that sets it to its own launch's need lets another thread lower it between that set and its launch, and
// the launch then fails with cudaErrorInvalidValue (seen with `eval --workers 2`: two batches selecting at once).
// The limit here only rises: a launch needing at most the largest size asked for so far is always allowed, and the
// limit itself does not change a launch's occupancy (its own dynamic size does).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace kvd::kernels {

inline cudaError_t raise_smem_limit(const void* kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> limit;  // (kernel, device) -> bytes set
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = limit[{kernel, device}];
  if (bytes <= have) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess) have = bytes;
  return e;
}

template <typename K>
cudaError_t raise_smem_limit(K* kernel, size_t bytes) {
  return raise_smem_limit(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace kvd::kernels
