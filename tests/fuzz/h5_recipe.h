// The fuzz input of fuzz_h5.cpp: a small byte "recipe" for a packed_text HDF5 file (kvdistill_format,
// root attributes, and per split the CSR datasets), built with the HDF5 C API and then opened through
// PackedTextReader. Mutating the recipe mutates what our reader checks (attribute presence, types and
// values, dataset dtypes, CSR offsets, declared dataset sizes with no data behind them) without fuzzing
// libhdf5's own on-disk format decoder, whose crashes on corrupt files are outside kvdistill.
//
// Encoding: a value is one signed byte, or 0x80 followed by 8 little-endian bytes (any int64). Reading
// past the end yields zeros, so every byte string is a recipe.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvd::fuzz::h5recipe {

// What a root attribute or dataset looks like in the file.
enum class Form : uint8_t { Natural = 0, Missing = 1, OtherType = 2, Double = 3 };

struct Attr {
  Form form = Form::Natural;
  int64_t value = 0;  // integers; the string attributes use `value` to pick their text
};

struct Data {
  Form form = Form::Natural;  // OtherType: int32 <-> int64; Double: float64
  bool declared_only = false;  // a chunked dataset of `declared` elements, none written
  int64_t declared = 0;
  std::vector<int64_t> values;
};

struct SplitRecipe {
  bool missing = false;
  Attr num_sequences;
  Data data[5];  // tokens (i32), seq_offsets (i64), seg_offsets (i64), seg_starts (i32), seg_docs (i64)
};

// Root attributes, in order.
inline const char* const kRootAttrs[] = {"kvdistill_format", "format_version", "tokenizer_sha256", "model_id",
                                         "seq_len", "separator_id", "seed", "val_fraction",
                                         "num_documents", "source_bytes"};
inline const char* const kDatasets[] = {"tokens", "seq_offsets", "seg_offsets", "seg_starts", "seg_docs"};
inline const bool kDatasetIs32[] = {true, false, false, true, false};

struct Recipe {
  Attr root[10];
  SplitRecipe split[2];  // train, val
};

class In {
 public:
  In(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  uint8_t byte() { return i_ < n_ ? p_[i_++] : 0; }
  int64_t value() {
    const uint8_t b = byte();
    if (b != 0x80) return static_cast<int8_t>(b);
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v |= uint64_t(byte()) << (8 * k);
    int64_t s;
    std::memcpy(&s, &v, 8);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_, i_ = 0;
};

class Out {
 public:
  void byte(uint8_t b) { s_ += static_cast<char>(b); }
  void value(int64_t v) {
    if (v >= -127 && v <= 127) return byte(static_cast<uint8_t>(static_cast<int8_t>(v)));
    byte(0x80);
    for (int k = 0; k < 8; ++k) byte(static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * k)));
  }
  const std::string& str() const { return s_; }

 private:
  std::string s_;
};

inline void read_attr(In& in, Attr& a) {
  a.form = static_cast<Form>(in.byte() % 4);
  a.value = in.value();
}
inline void write_attr(Out& o, const Attr& a) {
  o.byte(static_cast<uint8_t>(a.form));
  o.value(a.value);
}

inline Recipe decode(const uint8_t* p, size_t n) {
  In in(p, n);
  Recipe r;
  for (Attr& a : r.root) read_attr(in, a);
  for (SplitRecipe& s : r.split) {
    s.missing = in.byte() == 1;
    read_attr(in, s.num_sequences);
    for (Data& d : s.data) {
      const uint8_t f = in.byte();
      d.form = static_cast<Form>(f % 4);
      d.declared_only = (f & 4) != 0;
      if (d.declared_only) d.declared = in.value();
      const size_t count = in.byte() % 48;
      for (size_t k = 0; k < count; ++k) d.values.push_back(in.value());
    }
  }
  return r;
}

inline std::string encode(const Recipe& r) {
  Out o;
  for (const Attr& a : r.root) write_attr(o, a);
  for (const SplitRecipe& s : r.split) {
    o.byte(s.missing ? 1 : 0);
    write_attr(o, s.num_sequences);
    for (const Data& d : s.data) {
      o.byte(static_cast<uint8_t>(static_cast<uint8_t>(d.form) | (d.declared_only ? 4 : 0)));
      if (d.declared_only) o.value(d.declared);
      o.byte(static_cast<uint8_t>(d.values.size()));
      for (int64_t v : d.values) o.value(v);
    }
  }
  return o.str();
}

// The text of a string attribute picked by `v`.
inline std::string attr_text(const char* name, int64_t v) {
  if (std::strcmp(name, "kvdistill_format") == 0) {
    switch (((v % 3) + 3) % 3) {
      case 0: return "packed_text";
      case 1: return "responses";
      default: return "";
    }
  }
  return std::string(static_cast<size_t>(v < 0 ? 0 : v % 70), 'a');
}

inline void put_attr(hid_t obj, const char* name, const Attr& a, bool is_string) {
  if (a.form == Form::Missing) return;
  const hid_t space = H5Screate(H5S_SCALAR);
  const bool as_string = a.form == Form::OtherType ? !is_string : is_string;
  if (a.form == Form::Double) {
    const double d = static_cast<double>(a.value) / 100.0;
    const hid_t at = H5Acreate2(obj, name, H5T_NATIVE_DOUBLE, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(at, H5T_NATIVE_DOUBLE, &d);
    H5Aclose(at);
  } else if (as_string) {
    const std::string text = attr_text(name, a.value);
    const hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    const char* p = text.c_str();
    const hid_t at = H5Acreate2(obj, name, t, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(at, t, &p);
    H5Aclose(at);
    H5Tclose(t);
  } else {
    const hid_t at = H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(at, H5T_NATIVE_INT64, &a.value);
    H5Aclose(at);
  }
  H5Sclose(space);
}

inline void put_dataset(hid_t g, const char* name, const Data& d, bool is32) {
  if (d.form == Form::Missing) return;
  hid_t ftype = is32 ? H5T_STD_I32LE : H5T_STD_I64LE;
  if (d.form == Form::OtherType) ftype = is32 ? H5T_STD_I64LE : H5T_STD_I32LE;
  if (d.form == Form::Double) ftype = H5T_IEEE_F64LE;
  hsize_t n = d.declared_only ? static_cast<hsize_t>(d.declared < 0 ? -d.declared : d.declared) : d.values.size();
  if (n > (hsize_t(1) << 62)) n = hsize_t(1) << 62;
  const hsize_t maxdims = H5S_UNLIMITED, chunk = 64;
  const hid_t space = H5Screate_simple(1, &n, &maxdims);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(dcpl, 1, &chunk);
  const hid_t ds = H5Dcreate2(g, name, ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  if (ds >= 0 && !d.declared_only && n > 0) H5Dwrite(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, d.values.data());
  if (ds >= 0) H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(space);
}

// Writes the file of `r` at `path` (replacing it).
inline void build(const Recipe& r, const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) return;
  for (int k = 0; k < 10; ++k) put_attr(f, kRootAttrs[k], r.root[k], k == 0 || k == 2 || k == 3);
  for (int s = 0; s < 2; ++s) {
    const SplitRecipe& sr = r.split[s];
    if (sr.missing) continue;
    const hid_t g = H5Gcreate2(f, s == 0 ? "train" : "val", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    put_attr(g, "num_sequences", sr.num_sequences, false);
    for (int k = 0; k < 5; ++k) put_dataset(g, kDatasets[k], sr.data[k], kDatasetIs32[k]);
    H5Gclose(g);
  }
  H5Fclose(f);
}

// A valid packed_text file: seq_len 8; train holds 2 sequences (5 + 5 tokens, the second in two
// segments), val 1 sequence of 3 tokens.
inline Recipe valid() {
  Recipe r;
  const int64_t root[10] = {0, 1, 64, 4, 8, 0, 7, 0, 4, 100};
  for (int k = 0; k < 10; ++k) r.root[k].value = root[k];
  r.root[7].form = Form::Double;
  r.root[7].value = 5;  // val_fraction 0.05
  auto set = [](SplitRecipe& s, int64_t nseq, std::vector<std::vector<int64_t>> v) {
    s.num_sequences.value = nseq;
    for (int k = 0; k < 5; ++k) s.data[k].values = v[k];
  };
  set(r.split[0], 2, {{5, 6, 7, 8, 0, 9, 10, 0, 11, 12}, {0, 5, 10}, {0, 1, 3}, {0, 0, 3}, {0, 1, 2}});
  set(r.split[1], 1, {{13, 14, 0}, {0, 3}, {0, 1}, {0}, {3}});
  return r;
}

}  // namespace kvd::fuzz::h5recipe
