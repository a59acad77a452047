#include "cli/common.h"

#include <torch/cuda.h>

#include <cctype>

#include "common/error.h"
#include "common/fs.h"

namespace kvd::cli {

std::vector<int64_t> read_ids_file(const std::string& path, int64_t vocab_size) {
  const std::string text = read_file(path);
  std::vector<int64_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && !std::isspace(static_cast<unsigned char>(text[j]))) ++j;
    const std::string tok = text.substr(i, j - i);
    bool digits = tok.size() <= 18;
    for (char c : tok) digits = digits && std::isdigit(static_cast<unsigned char>(c));
    KVD_CHECK(digits, path, ": token ", ids.size() + 1, " '", tok.substr(0, 32), "' is not a non-negative integer id");
    const int64_t id = std::stoll(tok);
    KVD_CHECK(id < vocab_size, path, ": token ", ids.size() + 1, " id ", id, " is outside the vocabulary (size ",
              vocab_size, ")");
    ids.push_back(id);
    i = j;
  }
  KVD_CHECK(!ids.empty(), path, ": no token ids (expected whitespace-separated integers)");
  return ids;
}

}  // namespace kvd::cli
