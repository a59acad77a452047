#include "eval/run_parts.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "models/device.h"
#include "eval/tasks_io.h"
#include "export/gate_bundle.h"
#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/heuristics.h"
#include "models/chat_template.h"
#include "models/config.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
namespace kvd {
namespace evalrun {

using nlohmann::json;

// --- result files -------------------------------------------------------------------------------------------

std::string key_of(const std::string& method, const std::string& budget, const std::string& id) {
  return method + "\x1f" + budget + "\x1f" + id;
}

std::vector<json> read_results(const std::string& path) {
  std::vector<json> out;
  if (!std::filesystem::exists(path)) return out;
  const std::string text = read_file(path);
  size_t good = 0, start = 0;
  while (start < text.size()) {
    const size_t nl = text.find('\n', start);
    if (nl == std::string::npos) break;
    const std::string line = text.substr(start, nl - start);
    if (!line.empty()) {
      out.push_back(parse_json(line, path + ": line " + std::to_string(out.size() + 1), "not valid JSON",
                               "; remove it (or the file) and rerun"));
    }
    start = nl + 1;
    good = start;
  }
  if (good < text.size()) {
    std::cerr << "[eval] " << path << ": dropping a torn last line (" << text.size() - good << " bytes)\n";
    std::filesystem::resize_file(path, good);
  }
  return out;
}

void append_lines(const std::string& path, const std::vector<json>& lines) {
  if (lines.empty()) return;
  std::string buf;
  for (const json& j : lines) buf += j.dump() + "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) fail_write(path, errno, "opening for appending");
  const off_t before = ::lseek(fd, 0, SEEK_END);
  size_t off = 0;
  int err = test_disk_full(path) ? ENOSPC : 0;
  while (off < buf.size() && err == 0) {
    const ssize_t w = ::write(fd, buf.data() + off, buf.size() - off);
    if (w < 0) {
      if (errno != EINTR) err = errno;
      continue;
    }
    off += static_cast<size_t>(w);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (err != 0) {
    // No half line stays behind: the results of this batch are computed again on the rerun.
    if (before >= 0 && ::ftruncate(fd, before) != 0) {}
    ::close(fd);
    fail_write(path, err, "appending results", "; the results written before are kept and a rerun continues after them");
  }
  ::close(fd);
}

std::string fmt(double v, int prec) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << v;
  return os.str();
}

int64_t length_bucket(int64_t len) {
  if (len <= 0) return 0;
  return int64_t{1} << static_cast<int64_t>(std::llround(std::log2(static_cast<double>(len))));
}
std::string bucket_label(int64_t b) { return b >= 1024 && b % 1024 == 0 ? std::to_string(b / 1024) + "K" : std::to_string(b); }

}  // namespace evalrun
}  // namespace kvd
