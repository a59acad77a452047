// The one device parser: every command and config key that names a device goes through it.
#pragma once

#include <string>

#include <c10/core/Device.h>

namespace kvd {

// "cpu", "cuda", "cuda:N" or "auto" (cuda:local_rank modulo the visible devices when CUDA is present, else
// cpu). `option` names the flag or config key in errors ("--device", "train.device"). Throws kvd::Error for
// an unknown name, CUDA asked for but absent, or an index past the visible devices.
c10::Device parse_device(const std::string& s, const std::string& option = "--device", int local_rank = 0);

}  // namespace kvd
