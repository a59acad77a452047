#include "common/fs.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <streambuf>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"

namespace kvd {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  KVD_CHECK(in.good(), path, ": cannot open (", std::strerror(errno), ")");
  std::ostringstream ss;
  ss << in.rdbuf();
  KVD_CHECK(!in.bad(), path, ": read error");
  return ss.str();
}

void make_dirs(const std::string& dir) {
  if (dir.empty()) return;
  struct stat st{};
  if (::stat(dir.c_str(), &st) == 0) {
    KVD_CHECK(S_ISDIR(st.st_mode), dir, ": exists and is not a directory");
    return;
  }
  const size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) make_dirs(dir.substr(0, slash));
  KVD_CHECK(::mkdir(dir.c_str(), 0755) == 0 || errno == EEXIST, "cannot create directory ", dir, " (",
            std::strerror(errno), ")");
}

void make_parent_dirs(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) make_dirs(path.substr(0, slash));
}

namespace {

// A std::streambuf over a POSIX file descriptor that remembers the errno of the first failed write (a
// std::ofstream only says "failed", and a full disk must be reported as such).
class FdBuf : public std::streambuf {
 public:
  FdBuf(int fd, bool disk_full) : fd_(fd), disk_full_(disk_full) { setp(buf_, buf_ + sizeof buf_); }
  int error() const { return err_; }
  bool flush_all() { return sync() == 0; }

 protected:
  int_type overflow(int_type ch) override {
    if (sync() != 0) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  int sync() override {
    const char* p = pbase();
    size_t n = static_cast<size_t>(pptr() - pbase());
    while (n > 0 && err_ == 0) {
      if (disk_full_) {
        err_ = ENOSPC;
        break;
      }
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        err_ = errno;
        break;
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    setp(buf_, buf_ + sizeof buf_);
    return err_ == 0 ? 0 : -1;
  }

 private:
  int fd_;
  bool disk_full_;
  int err_ = 0;
  char buf_[1 << 16];
};

}  // namespace

bool test_disk_full(const std::string& path) {
  const char* text = std::getenv("KVD_TEST_DISK_FULL");
  return text && *text && path.find(text) != std::string::npos;
}

void fail_write(const std::string& path, int err, const std::string& what, const std::string& then) {
  if (err == ENOSPC || err == EDQUOT) {
    std::string dir = std::filesystem::path(path).parent_path().string();
    if (dir.empty()) dir = ".";
    KVD_FAIL(path, ": no space left on device (the disk holding ", dir, " is full); free space there and rerun", then);
  }
  KVD_FAIL(path, ": ", what, " failed (", std::strerror(err), ")", then);
}

void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& write) {
  make_parent_dirs(path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const std::string unchanged = "; " + path + " was not changed";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_write(tmp, errno, "creating the file", unchanged);
  bool open = true;
  try {
    FdBuf buf(fd, test_disk_full(path));
    std::ostream out(&buf);
    write(out);
    const bool flushed = buf.flush_all();
    if (!flushed || buf.error() != 0) fail_write(path, buf.error() ? buf.error() : EIO, "writing", unchanged);
    if (::fsync(fd) != 0) fail_write(path, errno, "fsync", unchanged);
    open = false;
    if (::close(fd) != 0) fail_write(path, errno, "closing", unchanged);
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    KVD_CHECK(!ec, path, ": cannot rename temporary into place (", ec.message(), ")");
  } catch (...) {
    if (open) ::close(fd);
    std::remove(tmp.c_str());
    throw;
  }
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic(path, [&](std::ostream& os) { os.write(bytes.data(), static_cast<std::streamsize>(bytes.size())); });
}

bool remove_tree(const std::string& path) {
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT;
  if (!S_ISDIR(st.st_mode)) return ::unlink(path.c_str()) == 0;
  // Depth-first, without following symlinks or crossing into other filesystems.
  const int rc = ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int type, struct FTW*) -> int {
        return (type == FTW_DP ? ::rmdir(p) : ::unlink(p)) == 0 ? 0 : -1;
      },
      16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
  return rc == 0;
}

// FIPS 180-4 SHA-256.
std::string sha256_hex(const void* data, size_t n) {
  static constexpr std::array<uint32_t, 64> K = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int r) { return (x >> r) | (x << (32 - r)); };
  auto block = [&](const uint8_t* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  };
  const auto* bytes = static_cast<const uint8_t*>(data);
  size_t full = n / 64;
  for (size_t i = 0; i < full; ++i) block(bytes + 64 * i);
  uint8_t tail[128] = {0};
  size_t rem = n - full * 64;
  std::memcpy(tail, bytes + full * 64, rem);
  tail[rem] = 0x80;
  size_t tail_len = rem + 9 <= 64 ? 64 : 128;
  uint64_t bits = uint64_t(n) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_len - 1 - i] = uint8_t(bits >> (8 * i));
  block(tail);
  if (tail_len == 128) block(tail + 64);
  char out[65];
  for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h[i]);
  return std::string(out, 64);
}

}  // namespace kvd
