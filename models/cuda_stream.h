// A CUDA stream of the holder's own (CUDA builds only). LibTorch's stream pool hands out its streams in turn, so two
// holders can get the same one: a worker thread's stream (eval --workers) could then be another thread's graph
// capture stream, and its work would land in that capture. An OwnedStream is created for its holder alone and
// destroyed with it, after its queued work finished.
#pragma once

#if KVD_WITH_CUDA
#include <c10/core/Device.h>
#include <c10/cuda/CUDAStream.h>

namespace kvd {

class OwnedStream {
 public:
  explicit OwnedStream(c10::DeviceIndex device);  // non-blocking: no implicit order with the legacy default stream
  ~OwnedStream();
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  c10::cuda::CUDAStream get() const { return stream_; }

 private:
  cudaStream_t raw_ = nullptr;
  c10::cuda::CUDAStream stream_;
};

// The calling thread's side stream on `device`: an OwnedStream made on the thread's first call and kept until the
// thread ends, so that repeated users (a graph decoder per decode) reuse one stream, and the caching allocator's
// blocks with it, rather than making a new stream each time.
c10::cuda::CUDAStream thread_side_stream(c10::DeviceIndex device);

}  // namespace kvd
#endif
