// The one device parser: every command and config key that names a device goes through it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace kvd {

// "cpu", "cuda", "cuda:N" or "auto" (cuda:local_rank modulo the visible devices when CUDA is present, else
// cpu). `option` names the flag or config key in errors ("--device", "train.device"). Throws kvd::Error for
// an unknown name, CUDA asked for but absent, or an index past the visible devices.
c10::Device parse_device(const std::string& s, const std::string& option = "--device", int local_rank = 0);

// A host vector as an int64 tensor on `device` (shape (v.size())) without draining the device's queue: on CUDA
// through pinned memory (LibTorch's caching host allocator) and a non-blocking copy, where a blocking copy from
// pageable memory waits for every queued kernel first. The selectors' counts and the cache's segment tables go
// to the device this way, so that a cut does not stall the launches behind it.
at::Tensor host_ints(const std::vector<int64_t>& v, c10::Device device);

// Waits for what the calling thread queued on `device`: its current CUDA stream, not the whole device (other
// threads' streams run on). A no-op on the CPU.
void sync_stream(c10::Device device);

// Waits for the whole device, then returns the caching allocator's unused blocks on it to the driver: every
// stream's, which another stream cannot reuse while they are cached (eval --workers retries a batch that ran out
// of memory after this). A no-op on the CPU.
void release_cached_memory(c10::Device device);

// For a worker thread that shares the device with others: while it lives, the thread's current CUDA stream on
// `device` is a stream of its own (models/cuda_stream.h: not one of LibTorch's pool, which other holders share),
// so its kernels may overlap the other workers' and its waits (sync_stream, copies to the host) wait for its own
// work only. A no-op on the CPU.
class WorkerStream {
 public:
  explicit WorkerStream(c10::Device device);
  ~WorkerStream();
  WorkerStream(const WorkerStream&) = delete;
  WorkerStream& operator=(const WorkerStream&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvd
