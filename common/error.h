// kvd::Error and KVD_CHECK: how library code reports a problem.
//
// Library code throws; only main() turns an Error into one line on stderr and an exit code.
// Messages name the file or key involved and, where it helps, what to do next:
//   KVD_CHECK(n <= max, path, ": header length ", n, " exceeds ", max, "; the file is corrupt");
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kvd {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(concat(args...));
}
}  // namespace detail

}  // namespace kvd

#define KVD_CHECK(cond, ...)                       \
  do {                                             \
    if (!(cond)) ::kvd::detail::fail(__VA_ARGS__); \
  } while (0)

#define KVD_FAIL(...) ::kvd::detail::fail(__VA_ARGS__)
