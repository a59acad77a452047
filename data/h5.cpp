#include "data/h5.h"

#include <hdf5.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <type_traits>

#include "common/error.h"
#include "common/fs.h"

namespace kvd::h5 {

static_assert(std::is_same_v<hid, hid_t>, "data/h5.h assumes HDF5 >= 1.10 (64-bit hid_t)");

namespace {

// One lock around every HDF5 call (see h5.h). Recursive: a wrapper may call another wrapper.
std::recursive_mutex& lib_mutex() {
  static std::recursive_mutex m;
  return m;
}

// Silences HDF5's automatic error-stack printing, once per process.
void init_library() {
  static std::once_flag once;
  std::call_once(once, [] {
    H5open();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  });
}

struct Lock {
  std::lock_guard<std::recursive_mutex> g{lib_mutex()};
  Lock() { init_library(); }
};

// The innermost description on HDF5's current error stack (the most specific reason), or "".
std::string hdf5_reason() {
  std::string reason;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* e, void* data) -> herr_t {
        if (n == 0 && e->desc && *e->desc) *static_cast<std::string*>(data) = e->desc;
        return 0;
      },
      &reason);
  H5Eclear2(H5E_DEFAULT);
  return reason.empty() ? "" : " (HDF5: " + reason + ")";
}

// A failed write: a full disk (ENOSPC from HDF5's POSIX driver, or the KVD_TEST_DISK_FULL hook) gets the
// common "no space left on device" message naming the file; anything else HDF5's own reason.
[[noreturn]] void fail_h5_write(const std::string& file, const std::string& where, const std::string& what) {
  const std::string why = hdf5_reason();
  if (why.find("errno = 28") != std::string::npos || why.find("No space left") != std::string::npos)
    fail_write(file, ENOSPC, what, "; the output is incomplete: rerun the command");
  KVD_FAIL(where, ": ", what, why, "; is the disk full?");
}

}  // namespace

namespace detail {
// An HDF5 id closed by the matching H5?close when the last owner goes away.
struct Id {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Id(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  ~Id() {
    if (id >= 0 && close) {
      Lock lock;
      close(id);
    }
  }
};
}  // namespace detail

namespace {

// Owns a temporary id (a property list, dataspace, type or attribute) within one function.
struct Tmp {
  hid_t id;
  herr_t (*close)(hid_t);
  Tmp(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Tmp(const Tmp&) = delete;
  Tmp& operator=(const Tmp&) = delete;
  ~Tmp() {
    if (id >= 0) close(id);
  }
  operator hid_t() const { return id; }
};

template <typename T>
hid_t native_type() {
  if constexpr (std::is_same_v<T, int32_t>) return H5T_NATIVE_INT32;
  else return H5T_NATIVE_INT64;
}

template <typename T>
constexpr DType dtype_of() {
  static_assert(std::is_same_v<T, int32_t> || std::is_same_v<T, int64_t>, "datasets hold int32 or int64");
  return std::is_same_v<T, int32_t> ? DType::Int32 : DType::Int64;
}

}  // namespace

const char* dtype_name(DType t) { return t == DType::Int32 ? "int32" : "int64"; }

// ---- Object --------------------------------------------------------------------------------------

Object::Object(std::shared_ptr<detail::Id> id, std::string file, std::string name)
    : id_(std::move(id)), file_(std::move(file)), name_(std::move(name)) {}

hid Object::id() const {
  KVD_CHECK(id_ && id_->id >= 0, file_, ": ", name_, ": used after the file was closed");
  return id_->id;
}

std::string Object::where() const { return name_ == "/" ? file_ : file_ + ": " + name_; }

bool Object::has_attr(const std::string& attr) const {
  Lock lock;
  const htri_t r = H5Aexists(id(), attr.c_str());
  KVD_CHECK(r >= 0, where(), ": cannot look up attribute '", attr, "'", hdf5_reason());
  return r > 0;
}

std::vector<std::string> Object::attr_names() const {
  Lock lock;
  std::vector<std::string> names;
  hsize_t idx = 0;
  const herr_t r = H5Aiterate2(
      id(), H5_INDEX_NAME, H5_ITER_INC, &idx,
      [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
        static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
      },
      &names);
  KVD_CHECK(r >= 0, where(), ": cannot list attributes", hdf5_reason());
  return names;
}

namespace {

// Creates (replacing any existing one) a scalar attribute of `file_type` and writes `mem_type` data.
void write_scalar_attr(hid_t obj, const std::string& where, const std::string& attr, hid_t file_type,
                       hid_t mem_type, const void* value) {
  if (H5Aexists(obj, attr.c_str()) > 0)
    KVD_CHECK(H5Adelete(obj, attr.c_str()) >= 0, where, ": cannot replace attribute '", attr, "'", hdf5_reason());
  Tmp space(H5Screate(H5S_SCALAR), H5Sclose);
  Tmp a(H5Acreate2(obj, attr.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  KVD_CHECK(a.id >= 0, where, ": cannot create attribute '", attr, "'", hdf5_reason());
  KVD_CHECK(H5Awrite(a, mem_type, value) >= 0, where, ": cannot write attribute '", attr, "'", hdf5_reason());
}

// Opens a scalar attribute; throws "missing" or "not scalar" with context.
hid_t open_scalar_attr(hid_t obj, const std::string& where, const std::string& attr) {
  const htri_t ex = H5Aexists(obj, attr.c_str());
  KVD_CHECK(ex >= 0, where, ": cannot look up attribute '", attr, "'", hdf5_reason());
  KVD_CHECK(ex > 0, where, ": attribute '", attr, "' is missing");
  const hid_t a = H5Aopen(obj, attr.c_str(), H5P_DEFAULT);
  KVD_CHECK(a >= 0, where, ": cannot open attribute '", attr, "'", hdf5_reason());
  Tmp space(H5Aget_space(a), H5Sclose);
  if (H5Sget_simple_extent_type(space) != H5S_SCALAR &&
      !(H5Sget_simple_extent_ndims(space) == 1 && H5Sget_simple_extent_npoints(space) == 1)) {
    H5Aclose(a);
    KVD_FAIL(where, ": attribute '", attr, "' is not a scalar");
  }
  return a;
}

}  // namespace

void Object::set_attr(const std::string& attr, const std::string& value) {
  Lock lock;
  Tmp type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  const char* p = value.c_str();
  write_scalar_attr(id(), where(), attr, type, type, &p);
}

void Object::set_attr(const std::string& attr, int64_t value) {
  Lock lock;
  write_scalar_attr(id(), where(), attr, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

void Object::set_attr(const std::string& attr, double value) {
  Lock lock;
  write_scalar_attr(id(), where(), attr, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

std::string Object::attr_string(const std::string& attr) const {
  Lock lock;
  Tmp a(open_scalar_attr(id(), where(), attr), H5Aclose);
  Tmp ftype(H5Aget_type(a), H5Tclose);
  KVD_CHECK(H5Tget_class(ftype) == H5T_STRING, where(), ": attribute '", attr, "' is not a string");
  if (H5Tis_variable_str(ftype) > 0) {
    Tmp mtype(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mtype, H5T_VARIABLE);
    H5Tset_cset(mtype, H5Tget_cset(ftype));
    char* p = nullptr;
    KVD_CHECK(H5Aread(a, mtype, &p) >= 0, where(), ": cannot read attribute '", attr, "'", hdf5_reason());
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  // Fixed-length (e.g. written by h5py from numpy bytes): read the bytes, drop padding.
  const size_t n = H5Tget_size(ftype);
  KVD_CHECK(n > 0 && n <= (size_t(1) << 20), where(), ": attribute '", attr, "' is a string of ", n,
            " bytes; the file is corrupt");
  std::string s(n, '\0');
  Tmp mtype(H5Tcopy(ftype), H5Tclose);
  KVD_CHECK(H5Aread(a, mtype, s.data()) >= 0, where(), ": cannot read attribute '", attr, "'", hdf5_reason());
  const size_t end = s.find('\0');
  if (end != std::string::npos) s.resize(end);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

int64_t Object::attr_int(const std::string& attr) const {
  Lock lock;
  Tmp a(open_scalar_attr(id(), where(), attr), H5Aclose);
  Tmp ftype(H5Aget_type(a), H5Tclose);
  KVD_CHECK(H5Tget_class(ftype) == H5T_INTEGER, where(), ": attribute '", attr, "' is not an integer");
  int64_t v = 0;
  KVD_CHECK(H5Aread(a, H5T_NATIVE_INT64, &v) >= 0, where(), ": cannot read attribute '", attr, "'", hdf5_reason());
  return v;
}

double Object::attr_double(const std::string& attr) const {
  Lock lock;
  Tmp a(open_scalar_attr(id(), where(), attr), H5Aclose);
  Tmp ftype(H5Aget_type(a), H5Tclose);
  const H5T_class_t c = H5Tget_class(ftype);
  KVD_CHECK(c == H5T_FLOAT || c == H5T_INTEGER, where(), ": attribute '", attr, "' is not a number");
  double v = 0;
  KVD_CHECK(H5Aread(a, H5T_NATIVE_DOUBLE, &v) >= 0, where(), ": cannot read attribute '", attr, "'", hdf5_reason());
  return v;
}

// ---- Dataset -------------------------------------------------------------------------------------

int64_t Dataset::size() const {
  Lock lock;
  Tmp space(H5Dget_space(id()), H5Sclose);
  KVD_CHECK(space.id >= 0, where(), ": cannot get its dataspace", hdf5_reason());
  hsize_t dims[1] = {0};
  KVD_CHECK(H5Sget_simple_extent_dims(space, dims, nullptr) == 1, where(), ": not a 1-D dataset");
  return static_cast<int64_t>(dims[0]);
}

void Dataset::check_read_size(int64_t start, int64_t count, size_t elem_size) const {
  const int64_t n = size();
  KVD_CHECK(start >= 0 && count >= 0 && start <= n && count <= n - start, where(), ": range [", start, ", ",
            start + count, ") is outside the dataset (", n, " elements); the file is inconsistent");
  std::error_code ec;
  const uintmax_t file_bytes = std::filesystem::file_size(file_path(), ec);
  const double limit = (ec ? 0.0 : 1100.0 * static_cast<double>(file_bytes)) + 1048576.0;
  KVD_CHECK(static_cast<double>(count) * static_cast<double>(elem_size) <= limit, where(), ": ", count,
            " elements declared, more than this ", ec ? 0 : file_bytes,
            "-byte file can hold even compressed; the file is corrupt");
}

template <typename T>
void Dataset::check_type(const char* op) const {
  KVD_CHECK(dtype_ == dtype_of<T>(), where(), ": cannot ", op, " ", dtype_name(dtype_of<T>()),
            " elements: the dataset holds ", dtype_name(dtype_));
}

template <typename T>
void Dataset::append(const T* data, int64_t n) {
  check_type<T>("append");
  KVD_CHECK(n >= 0, where(), ": negative append count ", n);
  if (n == 0) return;
  Lock lock;
  const int64_t old = size();
  const hsize_t new_dims[1] = {static_cast<hsize_t>(old + n)};
  KVD_CHECK(H5Dset_extent(id(), new_dims) >= 0, where(), ": cannot extend to ", old + n, " elements", hdf5_reason());
  Tmp fspace(H5Dget_space(id()), H5Sclose);
  const hsize_t start[1] = {static_cast<hsize_t>(old)}, count[1] = {static_cast<hsize_t>(n)};
  H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr);
  Tmp mspace(H5Screate_simple(1, count, nullptr), H5Sclose);
  if (test_disk_full(file_path()))
    fail_write(file_path(), ENOSPC, "writing", "; the output is incomplete: rerun the command");
  if (H5Dwrite(id(), native_type<T>(), mspace, fspace, H5P_DEFAULT, data) < 0)
    fail_h5_write(file_path(), where(), "cannot write " + std::to_string(n) + " elements at " + std::to_string(old));
}

template <typename T>
void Dataset::read(int64_t start, int64_t count, T* out) const {
  check_type<T>("read");
  Lock lock;
  const int64_t n = size();
  KVD_CHECK(start >= 0 && count >= 0 && start <= n && count <= n - start, where(), ": range [", start, ", ", start + count,
            ") is outside the dataset (", n, " elements); the file is inconsistent");
  if (count == 0) return;
  Tmp fspace(H5Dget_space(id()), H5Sclose);
  const hsize_t s[1] = {static_cast<hsize_t>(start)}, c[1] = {static_cast<hsize_t>(count)};
  H5Sselect_hyperslab(fspace, H5S_SELECT_SET, s, nullptr, c, nullptr);
  Tmp mspace(H5Screate_simple(1, c, nullptr), H5Sclose);
  KVD_CHECK(H5Dread(id(), native_type<T>(), mspace, fspace, H5P_DEFAULT, out) >= 0, where(), ": cannot read [",
            start, ", ", start + count, ")", hdf5_reason(), "; the file may be truncated or corrupt");
}

template void Dataset::append<int32_t>(const int32_t*, int64_t);
template void Dataset::append<int64_t>(const int64_t*, int64_t);
template void Dataset::read<int32_t>(int64_t, int64_t, int32_t*) const;
template void Dataset::read<int64_t>(int64_t, int64_t, int64_t*) const;

// ---- Group ---------------------------------------------------------------------------------------

std::string Group::child_name(const std::string& child) const {
  return name_ == "/" ? "/" + child : name_ + "/" + child;
}

bool Group::has(const std::string& child) const {
  Lock lock;
  const htri_t r = H5Lexists(id(), child.c_str(), H5P_DEFAULT);
  KVD_CHECK(r >= 0, where(), ": cannot look up '", child, "'", hdf5_reason());
  return r > 0;
}

Group Group::create_group(const std::string& child) {
  Lock lock;
  Tmp gcpl(H5Pcreate(H5P_GROUP_CREATE), H5Pclose);
  H5Pset_obj_track_times(gcpl, false);  // no timestamps: the same data gives the same bytes
  const hid_t g = H5Gcreate2(id(), child.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT);
  KVD_CHECK(g >= 0, file_, ": cannot create group ", child_name(child), hdf5_reason());
  return Group(std::make_shared<detail::Id>(g, H5Gclose), file_, child_name(child));
}

Group Group::open_group(const std::string& child) const {
  Lock lock;
  KVD_CHECK(has(child), file_, ": group ", child_name(child), " is missing; the file is not a complete kvdistill dataset");
  const hid_t g = H5Gopen2(id(), child.c_str(), H5P_DEFAULT);
  KVD_CHECK(g >= 0, file_, ": cannot open group ", child_name(child), hdf5_reason());
  return Group(std::make_shared<detail::Id>(g, H5Gclose), file_, child_name(child));
}

Dataset Group::create_dataset(const std::string& child, DType t, const DatasetOptions& opt) {
  Lock lock;
  KVD_CHECK(opt.chunk > 0, file_, ": ", child_name(child), ": chunk must be positive");
  KVD_CHECK(opt.deflate >= 0 && opt.deflate <= 9, file_, ": ", child_name(child), ": deflate level must be 0..9");
  const hsize_t dims[1] = {0}, maxdims[1] = {H5S_UNLIMITED}, chunk[1] = {static_cast<hsize_t>(opt.chunk)};
  Tmp space(H5Screate_simple(1, dims, maxdims), H5Sclose);
  Tmp dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_chunk(dcpl, 1, chunk);
  H5Pset_obj_track_times(dcpl, false);  // no timestamps: the same data gives the same bytes
  if (opt.deflate > 0) {
    KVD_CHECK(H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0, file_, ": this HDF5 library has no deflate filter");
    if (opt.shuffle) H5Pset_shuffle(dcpl);
    H5Pset_deflate(dcpl, static_cast<unsigned>(opt.deflate));
  }
  const hid_t ftype = t == DType::Int32 ? H5T_STD_I32LE : H5T_STD_I64LE;
  const hid_t d = H5Dcreate2(id(), child.c_str(), ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  KVD_CHECK(d >= 0, file_, ": cannot create dataset ", child_name(child), hdf5_reason());
  return Dataset(std::make_shared<detail::Id>(d, H5Dclose), file_, child_name(child), t);
}

Dataset Group::open_dataset(const std::string& child) const {
  Lock lock;
  KVD_CHECK(has(child), file_, ": dataset ", child_name(child), " is missing; the file is not a complete kvdistill dataset");
  const hid_t d = H5Dopen2(id(), child.c_str(), H5P_DEFAULT);
  KVD_CHECK(d >= 0, file_, ": cannot open dataset ", child_name(child), hdf5_reason());
  auto owner = std::make_shared<detail::Id>(d, H5Dclose);
  Tmp space(H5Dget_space(d), H5Sclose);
  KVD_CHECK(H5Sget_simple_extent_ndims(space) == 1, file_, ": ", child_name(child), ": expected a 1-D dataset, found ",
            H5Sget_simple_extent_ndims(space), " dimensions");
  Tmp type(H5Dget_type(d), H5Tclose);
  const bool is_int = H5Tget_class(type) == H5T_INTEGER && H5Tget_sign(type) == H5T_SGN_2;
  const size_t bytes = H5Tget_size(type);
  KVD_CHECK(is_int && (bytes == 4 || bytes == 8), file_, ": ", child_name(child),
            ": expected int32 or int64 elements");
  return Dataset(std::move(owner), file_, child_name(child), bytes == 4 ? DType::Int32 : DType::Int64);
}

// ---- File ----------------------------------------------------------------------------------------

File::File(std::shared_ptr<detail::Id> id, std::string path) : Group(std::move(id), std::move(path), "/") {}

namespace {
// File access properties: closing the file closes every object still open in it (see File::close).
hid_t strong_close_fapl() {
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
  return fapl;
}
}  // namespace

File File::create(const std::string& path) {
  Lock lock;
  Tmp fapl(strong_close_fapl(), H5Pclose);
  const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  KVD_CHECK(f >= 0, path, ": cannot create HDF5 file", hdf5_reason(), "; check that the directory exists and is writable");
  return File(std::make_shared<detail::Id>(f, H5Fclose), path);
}

File File::open(const std::string& path, Access access) {
  Lock lock;
  std::error_code ec;
  KVD_CHECK(std::filesystem::exists(path, ec), path, ": no such file");
  KVD_CHECK(std::filesystem::is_regular_file(path, ec), path, ": not a regular file");
  const htri_t is = H5Fis_hdf5(path.c_str());
  H5Eclear2(H5E_DEFAULT);
  KVD_CHECK(is > 0, path, ": not an HDF5 file (no HDF5 signature); expected a dataset written by `kvdistill prepare`");
  Tmp fapl(strong_close_fapl(), H5Pclose);
  const hid_t f = H5Fopen(path.c_str(), access == Access::ReadOnly ? H5F_ACC_RDONLY : H5F_ACC_RDWR, fapl);
  if (f < 0) {
    const std::string why = hdf5_reason();
    const bool truncated = why.find("truncated") != std::string::npos;
    KVD_FAIL(path, truncated ? ": truncated HDF5 file" : ": cannot open HDF5 file", why,
             truncated ? "; the copy or the writer was interrupted: re-create it" : "");
  }
  return File(std::make_shared<detail::Id>(f, H5Fclose), path);
}

void File::flush() {
  Lock lock;
  if (H5Fflush(id(), H5F_SCOPE_LOCAL) < 0) fail_h5_write(file_, file_, "cannot flush");
}

void File::close() {
  Lock lock;
  if (!id_ || id_->id < 0) return;
  const hid_t f = id_->id;
  id_->id = -1;
  // The file was opened with H5F_CLOSE_STRONG: this also closes its open groups and datasets, so the
  // file is complete on disk when close() returns (writers rename it into place next).
  if (H5Fclose(f) < 0) fail_h5_write(file_, file_, "cannot close");
}

// ---- stamp ---------------------------------------------------------------------------------------

void write_stamp(File& f, const Stamp& s) {
  f.set_attr("kvdistill_format", s.format);
  f.set_attr("format_version", s.version);
  f.set_attr("tokenizer_sha256", s.tokenizer_sha256);
  f.set_attr("model_id", s.model_id);
}

Stamp check_stamp(const File& f, const std::string& format, int64_t version) {
  const std::string& p = f.file_path();
  KVD_CHECK(f.has_attr("kvdistill_format"), p,
            ": not a kvdistill dataset (no kvdistill_format attribute); make one with `kvdistill prepare`");
  Stamp s;
  s.format = f.attr_string("kvdistill_format");
  KVD_CHECK(s.format == format, p, ": kvdistill_format '", s.format, "', expected '", format,
            "'; pass a ", format, " dataset here");
  KVD_CHECK(f.has_attr("format_version"), p, ": attribute format_version is missing; the file is corrupt");
  s.version = f.attr_int("format_version");
  if (s.version != version)
    KVD_FAIL(p, ": format_version ", s.version, ", this kvdistill reads ", version,
             s.version > version ? "; upgrade kvdistill" : "; re-create it with this kvdistill");
  for (const char* a : {"tokenizer_sha256", "model_id"})
    KVD_CHECK(f.has_attr(a), p, ": attribute ", a, " is missing; the file is corrupt");
  s.tokenizer_sha256 = f.attr_string("tokenizer_sha256");
  s.model_id = f.attr_string("model_id");
  return s;
}

void check_tokenizer(const File& f, const Stamp& s, const std::string& tokenizer_sha256,
                     const std::string& tokenizer_path, const std::string& remake) {
  auto abbrev = [](const std::string& h) { return h.size() > 12 ? h.substr(0, 12) + "..." : h; };
  KVD_CHECK(s.tokenizer_sha256 == tokenizer_sha256, f.file_path(), ": tokenizer_sha256 ", abbrev(s.tokenizer_sha256),
            " (model '", s.model_id, "') does not match ", tokenizer_path, " (", abbrev(tokenizer_sha256),
            "); re-run `", remake, "` with this model");
}

}  // namespace kvd::h5
