// A thin RAII wrapper over the HDF5 C API (Debian libhdf5-dev, serial), enough for kvdistill's datasets:
// files, groups, scalar attributes (string, int, double) and 1-D chunked, deflate-compressed int32 /
// int64 datasets that grow by appending and are read back by ranges.
//
// Every failure throws kvd::Error naming the file and the object, with HDF5's innermost reason:
//   "data.h5: /train/tokens: cannot read [0, 4096) (HDF5: ... )"
// HDF5's own error-stack printing is switched off once, process-wide (H5Eset_auto2).
//
// Objects share ownership of their HDF5 id: copies are cheap and the id is closed with the last copy.
// Every HDF5 call goes through one process-wide lock, so objects may be used from several threads (the
// training reader prefetches on a background thread), whatever the library's build options.
//
// The kvdistill root stamp (DESIGN.md, "Formats"): every dataset file carries root attributes
//   kvdistill_format (string), format_version (int), tokenizer_sha256 (string), model_id (string)
// written by write_stamp() and checked by check_stamp() / check_tokenizer().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kvd::h5 {

using hid = int64_t;  // hid_t of HDF5 >= 1.10 (kept out of this header)

// Element type of a dataset.
enum class DType { Int32, Int64 };
const char* dtype_name(DType t);

// How File::open opens an existing file.
enum class Access { ReadOnly, ReadWrite };

// Storage of a new 1-D extendible dataset.
struct DatasetOptions {
  int64_t chunk = 1 << 16;  // elements per chunk (the unit of compression and of a read from disk)
  int deflate = 4;          // zlib level 0..9; 0 stores chunks uncompressed
  bool shuffle = true;      // byte-shuffle before deflate (helps small integers compress)
};

namespace detail {
struct Id;  // an open HDF5 id and how to close it
}

// Common to files, groups and datasets: a location in a file, with attributes.
class Object {
 public:
  const std::string& file_path() const { return file_; }
  // The object's path inside the file ("/", "/train", "/train/tokens").
  const std::string& name() const { return name_; }

  bool has_attr(const std::string& attr) const;
  std::vector<std::string> attr_names() const;
  // Writes (or replaces) a scalar attribute. Strings are stored variable-length UTF-8.
  void set_attr(const std::string& attr, const std::string& value);
  void set_attr(const std::string& attr, const char* value) { set_attr(attr, std::string(value)); }
  void set_attr(const std::string& attr, int64_t value);
  void set_attr(const std::string& attr, int value) { set_attr(attr, static_cast<int64_t>(value)); }
  void set_attr(const std::string& attr, double value);
  // Read a scalar attribute; throw "<file>: <object>: attribute 'x' is missing" or "... is not a string".
  std::string attr_string(const std::string& attr) const;
  int64_t attr_int(const std::string& attr) const;
  double attr_double(const std::string& attr) const;  // also accepts an integer attribute

 protected:
  Object() = default;
  Object(std::shared_ptr<detail::Id> id, std::string file, std::string name);
  hid id() const;
  std::string where() const;  // "<file>: <name>" for messages
  std::shared_ptr<detail::Id> id_;
  std::string file_, name_;
};

// A 1-D int32 or int64 dataset.
class Dataset : public Object {
 public:
  Dataset() = default;  // an empty handle; assign an opened dataset before use
  DType dtype() const { return dtype_; }
  // Current number of elements.
  int64_t size() const;
  // Appends n elements at the end (extends the dataset). T must match dtype().
  template <typename T>
  void append(const T* data, int64_t n);
  template <typename T>
  void append(const std::vector<T>& v) { append(v.data(), static_cast<int64_t>(v.size())); }
  // Reads elements [start, start + count) into out. Throws if the range is past the end.
  template <typename T>
  void read(int64_t start, int64_t count, T* out) const;
  template <typename T>
  std::vector<T> read(int64_t start, int64_t count) const {
    check_read_size(start, count, sizeof(T));
    std::vector<T> v(static_cast<size_t>(count));
    read(start, count, v.data());
    return v;
  }
  template <typename T>
  std::vector<T> read_all() const { return read<T>(0, size()); }

 private:
  friend class Group;
  Dataset(std::shared_ptr<detail::Id> id, std::string file, std::string name, DType t)
      : Object(std::move(id), std::move(file), std::move(name)), dtype_(t) {}
  template <typename T>
  void check_type(const char* op) const;
  // Throws before a read of `count` elements allocates more than the file could hold: a dataset's size
  // comes from the file, and a tiny file can declare 10^15 elements (chunks never written). The bound is
  // the file size times deflate's maximum ratio (about 1032:1), plus 1 MiB.
  void check_read_size(int64_t start, int64_t count, size_t elem_size) const;
  DType dtype_ = DType::Int32;
};

class Group : public Object {
 public:
  Group() = default;  // an empty handle
  // Whether a direct child (group or dataset) with this name exists.
  bool has(const std::string& child) const;
  Group create_group(const std::string& child);
  Group open_group(const std::string& child) const;
  // A new empty, extendible (unlimited) 1-D dataset.
  Dataset create_dataset(const std::string& child, DType t, const DatasetOptions& opt = {});
  // An existing 1-D dataset; throws if it is missing, not 1-D, or not int32 / int64.
  Dataset open_dataset(const std::string& child) const;

 protected:
  friend class File;
  Group(std::shared_ptr<detail::Id> id, std::string file, std::string name)
      : Object(std::move(id), std::move(file), std::move(name)) {}
  std::string child_name(const std::string& child) const;
};

// An open HDF5 file; as a Group it is the root group "/".
class File : public Group {
 public:
  File() = default;  // an empty handle
  // Creates `path`, replacing any file there.
  static File create(const std::string& path);
  // Opens an existing file. A missing file, a file that is not HDF5 and a truncated HDF5 file each
  // throw a kvd::Error naming `path`.
  static File open(const std::string& path, Access access = Access::ReadOnly);
  // Writes buffered data to disk.
  void flush();
  // Closes the file now (instead of with the last copy of any object from it), reporting errors.
  // Objects obtained from it must not be used afterwards.
  void close();

 private:
  File(std::shared_ptr<detail::Id> id, std::string path);
};

// Buffers appends to a dataset and writes them `chunk` elements at a time (one HDF5 call per chunk
// instead of one per small append). flush() writes what is left; the destructor does not (it cannot
// report errors), so writers call flush() before closing.
template <typename T>
class Appender {
 public:
  Appender() = default;
  Appender(Dataset ds, int64_t chunk) : ds_(std::move(ds)), chunk_(chunk) { buf_.reserve(static_cast<size_t>(chunk)); }
  void push(T v) {
    buf_.push_back(v);
    if (static_cast<int64_t>(buf_.size()) >= chunk_) flush();
  }
  void push(const T* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) push(p[i]);
  }
  void flush() {
    if (!buf_.empty()) ds_.append(buf_);
    written_ += static_cast<int64_t>(buf_.size());
    buf_.clear();
  }
  // Elements pushed so far (written or buffered).
  int64_t size() const { return written_ + static_cast<int64_t>(buf_.size()); }

 private:
  Dataset ds_;
  int64_t chunk_ = 1;
  std::vector<T> buf_;
  int64_t written_ = 0;
};

// ---- the kvdistill root stamp -------------------------------------------------------------------

struct Stamp {
  std::string format;            // kvdistill_format, e.g. "packed_text"
  int64_t version = 0;           // format_version
  std::string tokenizer_sha256;  // sha256 of the tokenizer.json the tokens came from
  std::string model_id;          // the model the dataset was made for (its directory name)
};

void write_stamp(File& f, const Stamp& s);
// Reads the four root attributes and checks format and version:
//   "<file>: not a kvdistill dataset (no kvdistill_format attribute); ..."
//   "<file>: kvdistill_format 'x', expected 'packed_text'; ..."
//   "<file>: format_version 3, this kvdistill reads 1; ..."
Stamp check_stamp(const File& f, const std::string& format, int64_t version);
// Throws unless the stamp's tokenizer_sha256 equals `tokenizer_sha256`, the fingerprint of the
// tokenizer at `tokenizer_path`: "<file>: tokenizer_sha256 ab12... does not match <tokenizer_path>
// (cd34...); re-run `<remake>` with this model".
void check_tokenizer(const File& f, const Stamp& s, const std::string& tokenizer_sha256,
                     const std::string& tokenizer_path, const std::string& remake);

}  // namespace kvd::h5
