// Shared by the fuzz targets (tests/fuzz/fuzz_*.cpp). Each target defines LLVMFuzzerTestOneInput and
// follows one rule: a reader may reject any input with a kvd::Error (our one-line, file-naming error),
// and nothing else. Any other exception (an nlohmann type_error, std::bad_alloc, std::length_error, ...)
// escapes the target and aborts, which libFuzzer reports as a crash, as do ASan / UBSan findings, a
// stack overflow, an allocation over -malloc_limit_mb and a timeout.
//
// Built two ways (tests/fuzz/CMakeLists.txt):
//   KVD_FUZZ=ON (clang): fuzz_<name>, a libFuzzer binary with ASan + UBSan;
//   the normal build (g++): fuzz_replay_<name> = the same source + replay_main.cpp, which feeds every
//   seed and every file of tests/fuzz/regressions/<name>/ to LLVMFuzzerTestOneInput (CTest fuzz.<name>).
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"

namespace kvd::fuzz {

inline std::vector<std::string>* scratch_list() {
  static auto* v = new std::vector<std::string>;
  return v;
}

// A scratch file path private to this process ("/dev/shm/kvd_fuzz_<pid>_<name>" when /dev/shm exists):
// readers that take a path read the input from it.
// The process removes it at exit (a file, or a directory holding kvdistill.json).
inline std::string scratch_path(const std::string& name) {
  static const std::string dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  static const bool registered = [] {
    std::atexit([] {
      for (const std::string& p : *scratch_list()) {
        std::remove((p + "/kvdistill.json").c_str());
        std::remove(p.c_str());  // a file, or the directory once it is empty
      }
    });
    return true;
  }();
  (void)registered;
  const std::string p = dir + "/kvd_fuzz_" + std::to_string(::getpid()) + "_" + name;
  scratch_list()->push_back(p);
  return p;
}

inline void write_bytes(const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}
inline void write_bytes(const std::string& path, std::string_view s) { write_bytes(path, s.data(), s.size()); }

// Runs `f`; a kvd::Error is an accepted outcome (the input was rejected cleanly). The message must name
// something: an empty message is a bug too.
template <typename F>
void expect_clean(F&& f) {
  try {
    f();
  } catch (const kvd::Error& e) {
    if (std::string_view(e.what()).empty()) std::abort();
    static const bool verbose = std::getenv("KVD_FUZZ_VERBOSE") != nullptr;  // see why an input is rejected
    if (verbose) std::fprintf(stderr, "rejected: %s\n", e.what());
  }
}

// Splits the input at the first "\n@@\n" line into two parts (the second is empty without one), for
// targets that take two inputs (a file and overrides, a file and a text).
inline std::pair<std::string_view, std::string_view> split2(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const size_t at = all.find("\n@@\n");
  if (at == std::string_view::npos) return {all, {}};
  return {all.substr(0, at), all.substr(at + 4)};
}

}  // namespace kvd::fuzz
