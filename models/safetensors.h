// safetensors: a validating mmap reader, a writer in the reference layout, and sharded checkpoints.
// Torch-free on purpose (bytes, dtypes and shapes only); models/weights.h turns views into tensors.
// Format and validation rules: docs/ecosystem.md, "safetensors".
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/mapped_file.h"

namespace kvd {

enum class DType : uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType d);              // bytes per element
const char* dtype_name(DType d);         // "BF16", ...
// Parses a safetensors dtype string; throws kvd::Error "<context>: unknown dtype 'X'".
DType dtype_from_name(const std::string& name, const std::string& context);

// A tensor inside a mapped file. `data` stays valid while the owning SafetensorsFile lives.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
};

// One .safetensors file, mmapped and validated on open (header length, JSON, dtypes, shapes,
// offsets that tile the buffer exactly with no overlap or hole, no duplicate names). Any violation
// throws kvd::Error whose message starts with the file path and names the problem.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return file_.path(); }
  const std::vector<TensorView>& tensors() const { return tensors_; }  // in file order
  const TensorView* find(const std::string& name) const;              // nullptr if absent
  const TensorView& at(const std::string& name) const;                // throws naming file + tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  MappedFile file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: points at caller-owned, row-major, little-endian bytes.
struct TensorRef {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};

// Writes one file in the reference layout: tensors sorted by dtype alignment (descending) then name,
// header padded with spaces to a multiple of 8. Atomic (temp file + fsync + rename).
void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `tensors` under `dir` as model.safetensors, or, when their total exceeds `max_shard_bytes`,
// as model-0000k-of-0000N.safetensors plus model.safetensors.index.json (HF layout).
void write_checkpoint(const std::string& dir, const std::vector<TensorRef>& tensors, size_t max_shard_bytes,
                      const std::map<std::string, std::string>& metadata = {});

// The weights of a Hugging Face model directory: model.safetensors, or the shards named by
// model.safetensors.index.json. A missing shard, a tensor named in the index but absent from its shard,
// or a name present in two shards is a kvd::Error naming the file.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& model_dir);
  const TensorView* find(const std::string& name) const;
  const TensorView& at(const std::string& name) const;  // throws "<dir>: tensor 'X' not found"
  std::vector<std::string> names() const;                // sorted
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

}  // namespace kvd
