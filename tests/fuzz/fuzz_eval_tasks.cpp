// Fuzz target: an eval task file (JSONL, one sample per line), then the string-match scorer on it.
#include "eval/tasks_io.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("tasks.jsonl");
  kvd::fuzz::write_bytes(path, data, size);
  kvd::fuzz::expect_clean([&] {
    for (const kvd::EvalSample& s : kvd::read_eval_tasks(path)) {
      const double v = kvd::string_match(s.context, s.answers, kvd::match_rule_for(s.task));
      if (!(v >= 0.0 && v <= 1.0)) std::abort();
    }
  });
  return 0;
}
