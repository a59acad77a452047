#include "models/device.h"

#include <map>
#include <optional>

#include <c10/core/CachingDeviceAllocator.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "common/error.h"

#if KVD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "models/cuda_stream.h"
#endif

namespace kvd {

c10::Device parse_device(const std::string& s, const std::string& option, int local_rank) {
  if (s == "cpu") return c10::Device(c10::kCPU);
  const bool cuda = torch::cuda::is_available();
  if (s == "auto") {
    if (!cuda) return c10::Device(c10::kCPU);
    const int n = static_cast<int>(torch::cuda::device_count());
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank % n));
  }
  KVD_CHECK(s == "cuda" || s.rfind("cuda:", 0) == 0, option, " ", s, ": expected auto, cpu, cuda or cuda:N");
  KVD_CHECK(cuda, option, " ", s, ": no CUDA device is visible on this machine; use ", option, " cpu");
  const int n = static_cast<int>(torch::cuda::device_count());
  if (s == "cuda") return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank % n));
  int index = -1;
  try {
    size_t used = 0;
    index = std::stoi(s.substr(5), &used);
    if (used != s.size() - 5) index = -1;
  } catch (const std::exception&) {
    index = -1;
  }
  KVD_CHECK(index >= 0, option, " ", s, ": expected auto, cpu, cuda or cuda:N");
  KVD_CHECK(index < n, option, " ", s, ": only ", n, " CUDA device(s) are visible");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

at::Tensor host_ints(const std::vector<int64_t>& v, c10::Device device) {
  at::Tensor h = torch::tensor(v, torch::kLong);  // (v.size())
  if (!device.is_cuda()) return device.is_cpu() ? h : h.to(device);
  // The pinned block returns to the allocator only once the copy queued on the current stream has run.
  return h.pin_memory().to(device, /*non_blocking=*/true);
}

void sync_stream(c10::Device device) {
  if (!device.is_cuda()) return;
#if KVD_WITH_CUDA
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
#else
  torch::cuda::synchronize();
#endif
}

void release_cached_memory(c10::Device device) {
  if (!device.is_cuda()) return;
  torch::cuda::synchronize();
  c10::getDeviceAllocator(device.type())->emptyCache();
}

#if KVD_WITH_CUDA
OwnedStream::OwnedStream(c10::DeviceIndex device)
    : stream_([&] {
        c10::cuda::CUDAGuard on(device);
        C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw_, cudaStreamNonBlocking));
        return c10::cuda::getStreamFromExternal(raw_, on.current_device().index());
      }()) {}

OwnedStream::~OwnedStream() {
  // Its work first (tensors freed on it may be handed to another stream next). Nothing here throws: a thread's side
  // stream goes when the thread ends, which for the main thread is at exit.
  if (cudaStreamSynchronize(raw_) != cudaSuccess || cudaStreamDestroy(raw_) != cudaSuccess) cudaGetLastError();
}

c10::cuda::CUDAStream thread_side_stream(c10::DeviceIndex device) {
  thread_local std::map<c10::DeviceIndex, std::unique_ptr<OwnedStream>> mine;
  std::unique_ptr<OwnedStream>& s = mine[device];
  if (!s) s = std::make_unique<OwnedStream>(device);
  return s->get();
}
#endif

struct WorkerStream::Impl {
#if KVD_WITH_CUDA
  std::unique_ptr<OwnedStream> stream;  // outlives the guard
  std::optional<c10::cuda::CUDAStreamGuard> guard;
#endif
};

WorkerStream::WorkerStream(c10::Device device) : impl_(std::make_unique<Impl>()) {
#if KVD_WITH_CUDA
  if (!device.is_cuda()) return;
  impl_->stream = std::make_unique<OwnedStream>(device.has_index() ? device.index() : c10::cuda::current_device());
  impl_->guard.emplace(impl_->stream->get());
#else
  (void)device;
#endif
}

WorkerStream::~WorkerStream() = default;

}  // namespace kvd
