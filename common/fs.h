// Small filesystem helpers shared by every writer: read a whole file, write one atomically.
#pragma once

#include <cstddef>
#include <functional>
#include <ostream>
#include <string>

namespace kvd {

// The whole file as bytes; throws kvd::Error naming `path` if it cannot be read.
std::string read_file(const std::string& path);

// Creates directory `dir` and its missing parents (like `mkdir -p`); throws kvd::Error naming the first
// directory that cannot be made.
void make_dirs(const std::string& dir);
// Creates the missing parent directories of an output file `path` (every writer calls this, so
// `--out runs/x/y.h5` works without a prior mkdir).
void make_parent_dirs(const std::string& path);

// Writes `path` atomically: `write` fills "<path>.tmp.<pid>", which is flushed, fsync'ed and renamed
// over `path`. Missing parent directories are created. If `write` throws, the temporary is removed and
// nothing at `path` changes.
void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write);
void write_file_atomic(const std::string& path, const std::string& bytes);

// Fails with the one message every writer gives when `path` cannot be written. For ENOSPC / EDQUOT:
//   "<path>: no space left on device (the disk holding <dir> is full); free space there and rerun"
// otherwise "<path>: <what> failed (<strerror(err)>)". `then` is appended (e.g. "; <path> was not changed").
[[noreturn]] void fail_write(const std::string& path, int err, const std::string& what, const std::string& then = "");

// Test hook (docs/reliability.md): with KVD_TEST_DISK_FULL=<text> in the environment, every write to a path
// that contains <text> fails as on a full disk (errno ENOSPC). Writers call this before writing.
bool test_disk_full(const std::string& path);

// Removes a file or a directory tree (like `rm -rf`); a missing path is not an error. Returns false and
// leaves what it could not remove on failure. Use this instead of std::filesystem::remove_all, which
// crashes in binaries linked with PyPI's LibTorch 2.11 (its exported std::filesystem symbols win).
bool remove_tree(const std::string& path);

// Lower-case hex SHA-256 of a byte string (used for tokenizer and config fingerprints).
std::string sha256_hex(const void* data, size_t n);
inline std::string sha256_hex(const std::string& s) { return sha256_hex(s.data(), s.size()); }

}  // namespace kvd
