// Fuzz target: a YAML run config (`kvdistill train --config`), then key=value overrides, one per line,
// after a "\n@@\n" line. The resolved config must print and survive the checkpoint round trip.
#include "train/config.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = kvd::fuzz::split2(data, size);
  const std::string_view yaml = parts.first, rest = parts.second;
  std::vector<std::string> overrides;
  for (size_t at = 0; at < rest.size();) {
    size_t nl = rest.find('\n', at);
    if (nl == std::string_view::npos) nl = rest.size();
    overrides.emplace_back(rest.substr(at, nl - at));
    at = nl + 1;
  }
  kvd::fuzz::expect_clean([&] {
    const kvd::RunConfig c = kvd::resolve_config(std::string(yaml), "fuzz.yaml", overrides);
    (void)c.to_text();
    const kvd::RunConfig back = kvd::config_from_values(c.values, "checkpoint");
    if (back.values != c.values) std::abort();
  });
  return 0;
}
