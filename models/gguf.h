// GGUF (llama.cpp's model file format, version 3): a validating mmap reader and dequantization to
// float32. Torch-free. Format facts: docs/ecosystem.md, "GGUF"; block layouts are documented
// next to each dequantizer in gguf.cpp.
//
// File layout (all little-endian):
//   "GGUF" | u32 version (3) | u64 n_tensors | u64 n_kv
//   n_kv x      { string key | u32 value type | value }
//   n_tensors x { string name | u32 n_dims | u64 dims[n_dims] (innermost first) | u32 ggml type | u64 offset }
//   padding to general.alignment (default 32)
//   data section: tensor i lives at data_offset + offset_i (offset_i a multiple of the alignment)
// A string is { u64 length | bytes } (not NUL-terminated); an array is { u32 element type | u64 count | elements }.
//
// Every length, count and offset read from the file is checked against the file size before use, so a
// corrupt or hostile file gives a kvd::Error whose message starts with the file path, never an
// out-of-bounds read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/mapped_file.h"

namespace kvd {

// ggml tensor types (the numeric ids are part of the file format).
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

// Facts about a ggml type: `block_size` elements are stored in `type_size` bytes.
struct GgmlTypeInfo {
  const char* name;
  uint32_t block_size;
  uint32_t type_size;
  bool dequantizable;  // gguf.cpp can turn it into float32
};
// nullptr for an id that is not a known ggml type.
const GgmlTypeInfo* ggml_type_info(uint32_t type_id);
const char* ggml_type_name(GgmlType t);  // "Q4_K", or "type<N>" when unknown

// Dequantizes `n` consecutive elements (a multiple of the type's block size) stored at `src`
// (n / block_size * type_size bytes) into `dst`. Throws kvd::Error for a type without a dequantizer.
// The arithmetic mirrors ggml's reference dequantizers in float32 (one rounding per multiply and per
// add, no fused multiply-add), so results are bit-identical to the `gguf` Python package.
void dequantize_row(GgmlType type, const uint8_t* src, float* dst, int64_t n);

// An IEEE half / bfloat16 bit pattern as float32 (exact).
float fp16_to_fp32(uint16_t h);
float bf16_to_fp32(uint16_t h);

// Metadata value types (ids are part of the format).
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Scalars keep their raw bits; arrays keep one entry per element. Accessors check
// the type and throw kvd::Error "<context>: ..." (context = "<path>: metadata 'key'") on a mismatch.
struct GgufValue {
  GgufType type = GgufType::U8;
  GgufType elem_type = GgufType::U8;  // element type when type == ARRAY (arrays of arrays are rejected)
  uint64_t bits = 0;                  // numeric or bool scalar: the raw little-endian bits, zero-extended
  std::string str;                    // STRING
  std::vector<uint64_t> elems;        // numeric or bool ARRAY: raw bits per element
  std::vector<std::string> strs;      // STRING ARRAY
  std::string context;                // for error messages

  bool is_array() const { return type == GgufType::ARRAY; }
  size_t size() const;  // number of array elements (1 for a scalar)

  // Any integer type (u8..i64) -> int64 (a u64 above INT64_MAX throws).
  int64_t as_int() const;
  // f32 / f64, or an integer type, as double (exact for f32).
  double as_double() const;
  bool as_bool() const;
  const std::string& as_string() const;
  // Integer (or bool) arrays as int64; float arrays as double; string arrays as strings.
  std::vector<int64_t> as_ints() const;
  std::vector<double> as_doubles() const;
  const std::vector<std::string>& as_strings() const;
};

// A tensor inside the mapped file. `data` stays valid while the owning GgufFile lives.
struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<uint64_t> dims;  // ggml order: dims[0] is the innermost (row length), as in the file
  uint64_t offset = 0;         // relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
  // Row-major shape, outermost first (= reversed dims): the numpy shape of gguf-py's reader and, for
  // a 2-D weight, Hugging Face's (out_features, in_features).
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  // Maps and validates the whole file (header, metadata, tensor infos, data ranges). Throws kvd::Error
  // "<path>: <problem>" on anything malformed or unsupported.
  explicit GgufFile(const std::string& path);

  const std::string& path() const { return file_.path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // file offset of the data section

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;  // nullptr if absent
  const GgufValue& at(const std::string& key) const;    // throws "<path>: metadata key 'k' not found"
  // Typed shortcuts (throw on a missing key or wrong type; the *_or forms return `def` when absent).
  int64_t get_int(const std::string& key) const { return at(key).as_int(); }
  int64_t get_int_or(const std::string& key, int64_t def) const;
  double get_double(const std::string& key) const { return at(key).as_double(); }
  double get_double_or(const std::string& key, double def) const;
  std::string get_string(const std::string& key) const { return at(key).as_string(); }
  std::string get_string_or(const std::string& key, const std::string& def) const;
  bool get_bool_or(const std::string& key, bool def) const;

  // Tensors in file order.
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;  // nullptr if absent
  const GgufTensor& tensor(const std::string& name) const;       // throws naming file and tensor

  // The tensor as float32, row-major in shape() order. Throws for types without a dequantizer.
  std::vector<float> dequantize(const GgufTensor& t) const;
  void dequantize(const GgufTensor& t, float* out) const;  // `out` holds t.numel() floats

 private:
  MappedFile file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace kvd
