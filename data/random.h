// Deterministic, platform-independent randomness for data pipelines: the same seed gives the same
// splits, shuffles and synthetic tasks on every machine and standard library (std::shuffle and the
// std distributions are implementation-defined, so they are not used).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace kvd {

// SplitMix64 finalizer: a bijective 64-bit mix.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 64-bit hash of bytes under a seed (FNV-1a, then mixed).
inline uint64_t hash_bytes(uint64_t seed, const void* data, size_t n) {
  uint64_t h = mix64(seed) ^ 0xCBF29CE484222325ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  return mix64(h ^ n);
}

// A 64-bit value mapped to [0, 1) with 53 bits.
inline double unit_interval(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

// SplitMix64 generator.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  // A stream derived from (seed, a, b), e.g. (seed, epoch) or (seed, task, sample).
  Rng(uint64_t seed, uint64_t a, uint64_t b = 0) : state_(mix64(mix64(seed) ^ mix64(a + 0x632BE59BD9B4E019ull)) ^ mix64(b)) {}
  uint64_t next() { return mix64(state_ += 0x9E3779B97F4A7C15ull) ; }
  // Uniform in [0, n) for n >= 1 (Lemire's multiply-shift with rejection: no modulo bias).
  uint64_t below(uint64_t n) {
    for (;;) {
      const unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
      const uint64_t low = static_cast<uint64_t>(m);
      if (low >= n || low >= (0 - n) % n) return static_cast<uint64_t>(m >> 64);
    }
  }
  // Uniform in [lo, hi] (inclusive).
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(below(static_cast<uint64_t>(hi - lo) + 1)); }
  double uniform() { return unit_interval(next()); }
  template <typename T>
  void shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(below(i))]);
  }
  template <typename T>
  const T& pick(const std::vector<T>& v) { return v[static_cast<size_t>(below(v.size()))]; }

 private:
  uint64_t state_;
};

}  // namespace kvd
