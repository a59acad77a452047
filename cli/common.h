// Helpers shared by the CLI commands: device parsing, timing, reading token-id files.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "models/device.h"

namespace kvd::cli {

using kvd::parse_device;  // models/device.h

// Whitespace-separated non-negative integers; throws kvd::Error naming the file and the bad token.
std::vector<int64_t> read_ids_file(const std::string& path, int64_t vocab_size);

struct Stopwatch {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

}  // namespace kvd::cli
