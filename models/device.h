// The one device parser: every command and config key that names a device goes through it.
#pragma once

#include <cstdint>
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

}  // namespace kvd
