// safetensors reader (mmap + full validation), writer (reference byte layout) and HF checkpoints.
// Format: docs/ecosystem.md, "safetensors".
//
// File layout:   [u64 LE: N] [N bytes: JSON header, space padded] [buffer: tensor bytes]
// Header entry:  "name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}  (relative to buffer)
#include "models/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <limits>
#include <regex>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_error.h"
#include "common/fs.h"

namespace kvd {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference reader's limit
constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
// In enum order (which is also the reference writer's sort order: it sorts by this order, descending).
constexpr DTypeInfo kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},    {DType::I8, "I8", 1},   {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::I16, "I16", 2}, {DType::U16, "U16", 2}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4}, {DType::U32, "U32", 4}, {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},   {DType::I64, "I64", 8}, {DType::U64, "U64", 8},
};

const DTypeInfo& dtype_info(DType d) {
  const auto i = static_cast<size_t>(d);
  KVD_CHECK(i < std::size(kDTypes), "invalid DType value ", i);
  return kDTypes[i];
}

// numel and byte length of a shape, or false on overflow. Each dimension and numel must fit int64
// (TensorView's shape and numel()); a zero dimension makes numel 0 whatever the others are.
bool shape_bytes(const std::vector<uint64_t>& shape, size_t elem_size, uint64_t* numel, uint64_t* nbytes) {
  constexpr auto kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  bool has_zero = false;
  for (uint64_t d : shape) {
    if (d > kMax) return false;
    has_zero = has_zero || d == 0;
  }
  uint64_t n = has_zero ? 0 : 1;
  for (uint64_t d : shape) {
    if (!has_zero && __builtin_mul_overflow(n, d, &n)) return false;
  }
  if (n > kMax) return false;
  uint64_t b = 0;
  if (__builtin_mul_overflow(n, static_cast<uint64_t>(elem_size), &b)) return false;
  *numel = n;
  *nbytes = b;
  return true;
}


// Parses JSON text and rejects duplicate keys at any level (nlohmann would silently keep the last) and
// nesting deeper than `max_depth` (protects against pathological inputs). `what` prefixes messages.
json parse_json_strict(const char* begin, const char* end, const std::string& what, int max_depth) {
  struct Frame {
    std::set<std::string> keys;
    std::string last_key;
  };
  std::vector<Frame> stack;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
    KVD_CHECK(depth <= max_depth, what, ": JSON nests deeper than expected (", max_depth, " levels)");
    switch (event) {
      case json::parse_event_t::object_start:
        stack.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case json::parse_event_t::key: {
        Frame& top = stack.back();
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!top.keys.insert(key).second) {
          if (stack.size() == 1) KVD_FAIL(what, ": duplicate name '", key, "'");
          KVD_FAIL(what, ": duplicate key '", key, "' in '", stack[stack.size() - 2].last_key, "'");
        }
        top.last_key = key;
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(begin, end, callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    KVD_FAIL(what, ": not valid JSON (", json_error_text(e), ")");
  }
}

std::string describe(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return std::string(v.type_name()) + " " + s;
}

// Appends `s` as a JSON string literal, escaping exactly as serde_json does (the reference writer):
// '"', '\\', \b \f \n \r \t, other control characters as \u00xx (lower-case hex); everything else raw.
void append_json_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xf];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Throws unless `s` is well-formed UTF-8 (names and metadata we write; the reader's JSON parser checks its own).
void check_utf8(const std::string& s, const std::string& what) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    KVD_CHECK(len != 0 && i + len <= n, what, ": not valid UTF-8");
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      KVD_CHECK((cc & 0xc0) == 0x80, what, ": not valid UTF-8");
      cp = (cp << 6) | (cc & 0x3f);
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    KVD_CHECK(!overlong && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff), what, ": not valid UTF-8");
    i += len;
  }
}

// One tensor to write, with its validated byte length.
struct PlannedTensor {
  const TensorRef* ref;
  uint64_t nbytes;
};

std::vector<PlannedTensor> plan_tensors(const std::string& path, const std::vector<TensorRef>& tensors) {
  std::vector<PlannedTensor> planned;
  planned.reserve(tensors.size());
  std::set<std::string> names;
  for (const TensorRef& t : tensors) {
    KVD_CHECK(t.name != "__metadata__", path, ": '__metadata__' is reserved and cannot name a tensor");
    KVD_CHECK(names.insert(t.name).second, path, ": duplicate tensor name '", t.name, "'");
    check_utf8(t.name, path + ": tensor name");
    std::vector<uint64_t> dims;
    for (int64_t d : t.shape) {
      KVD_CHECK(d >= 0, path, ": tensor '", t.name, "' has a negative dimension ", d);
      dims.push_back(static_cast<uint64_t>(d));
    }
    uint64_t numel = 0, nbytes = 0;
    KVD_CHECK(shape_bytes(dims, dtype_size(t.dtype), &numel, &nbytes), path, ": tensor '", t.name,
              "': shape is too large");
    KVD_CHECK(nbytes == 0 || t.data != nullptr, path, ": tensor '", t.name, "' has no data");
    planned.push_back({&t, nbytes});
  }
  // Reference order: dtype descending (in the reference's dtype order), then name (bytewise).
  std::sort(planned.begin(), planned.end(), [](const PlannedTensor& a, const PlannedTensor& b) {
    if (a.ref->dtype != b.ref->dtype) return a.ref->dtype > b.ref->dtype;
    return a.ref->name < b.ref->name;
  });
  return planned;
}

// The header JSON, formatted exactly as the reference writer formats it (compact, "__metadata__" first,
// entries in buffer order, each {"dtype","shape","data_offsets"}), padded with spaces to a multiple of 8.
std::string build_header(const std::string& path, const std::vector<PlannedTensor>& planned,
                         const std::map<std::string, std::string>& metadata) {
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool first_kv = true;
    for (const auto& [k, v] : metadata) {
      check_utf8(k, path + ": metadata key");
      check_utf8(v, path + ": metadata value of '" + k + "'");
      if (!first_kv) h += ',';
      first_kv = false;
      append_json_string(h, k);
      h += ':';
      append_json_string(h, v);
    }
    h += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (const PlannedTensor& p : planned) {
    if (!first) h += ',';
    first = false;
    append_json_string(h, p.ref->name);
    h += ":{\"dtype\":\"";
    h += dtype_name(p.ref->dtype);
    h += "\",\"shape\":[";
    for (size_t i = 0; i < p.ref->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(p.ref->shape[i]);
    }
    h += "],\"data_offsets\":[";
    h += std::to_string(offset);
    h += ',';
    KVD_CHECK(!__builtin_add_overflow(offset, p.nbytes, &offset), path, ": total size overflows");
    h += std::to_string(offset);
    h += "]}";
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  KVD_CHECK(h.size() <= kMaxHeaderBytes, path, ": header would be ", h.size(), " bytes, over the ",
            kMaxHeaderBytes, "-byte limit");
  return h;
}

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k, n);
  return buf;
}

// Removes files a previous write_checkpoint may have left in `dir` that would shadow or confuse the new
// layout (HF save_pretrained does the same for its own shard names).
void remove_stale_weights(const fs::path& dir, bool keep_single, const std::set<std::string>& keep) {
  static const std::regex shard_re(R"(model-\d{5}-of-\d{5}\.safetensors)");
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const bool stale = (name == kSingleFile && !keep_single) ||
                       (name == kIndexFile && keep_single) ||
                       (std::regex_match(name, shard_re) && !keep.count(name));
    if (stale) fs::remove(entry.path(), ec);
  }
}

}  // namespace

// ---- dtypes ------------------------------------------------------------------------------------------

size_t dtype_size(DType d) { return dtype_info(d).size; }

const char* dtype_name(DType d) { return dtype_info(d).name; }

DType dtype_from_name(const std::string& name, const std::string& context) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  KVD_FAIL(context, ": unknown dtype '", name, "'");
}

int64_t TensorView::numel() const {
  // A reader-validated shape has no overflow; a zero dimension short-circuits huge siblings.
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- reader ------------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const uint8_t* bytes = file_.data();
  const uint64_t size = file_.size();
  KVD_CHECK(size >= 8, path, ": truncated: ", size, " bytes, too short for the 8-byte header length");

  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian u64
  KVD_CHECK(n <= kMaxHeaderBytes, path, ": header length ", n, " exceeds the ", kMaxHeaderBytes,
            "-byte limit; the file is corrupt or not safetensors");
  KVD_CHECK(n <= size - 8, path, ": truncated: header says ", n, " bytes, file has ", size - 8, " after the length");
  KVD_CHECK(n > 0 && bytes[8] == '{', path, ": header is empty or does not start with '{'; not a safetensors file");

  // The parser checks UTF-8 inside strings (bytes outside strings must be JSON syntax anyway). Legitimate
  // headers nest 3 levels (top object > entry > shape); the limit only stops pathological inputs.
  const char* hbegin = reinterpret_cast<const char*>(bytes + 8);
  const json header = parse_json_strict(hbegin, hbegin + n, path + ": header", 64);
  KVD_CHECK(header.is_object(), path, ": header is not a JSON object");

  const uint8_t* buffer = bytes + 8 + n;
  const uint64_t buffer_len = size - 8 - n;

  struct Entry {
    TensorView view;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      KVD_CHECK(value.is_object() || value.is_null(), path, ": '__metadata__' must map strings to strings, got ",
                describe(value));
      if (value.is_null()) continue;
      for (const auto& [k, v] : value.items()) {
        KVD_CHECK(v.is_string(), path, ": '__metadata__' value of '", k, "' must be a string, got ", describe(v));
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    KVD_CHECK(value.is_object(), where, ": entry must be an object, got ", describe(value));
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      KVD_CHECK(value.contains(key), where, ": missing '", key, "'");
    }
    const json& jd = value["dtype"];
    const json& js = value["shape"];
    const json& jo = value["data_offsets"];
    KVD_CHECK(jd.is_string(), where, ": 'dtype' must be a string, got ", describe(jd));
    KVD_CHECK(js.is_array(), where, ": 'shape' must be an array, got ", describe(js));
    KVD_CHECK(jo.is_array() && jo.size() == 2, where, ": 'data_offsets' must be [begin, end], got ", describe(jo));

    Entry e;
    e.view.name = name;
    e.view.dtype = dtype_from_name(jd.get<std::string>(), where);
    std::vector<uint64_t> dims;
    for (const json& d : js) {
      KVD_CHECK(d.is_number_unsigned(), where, ": shape entries must be non-negative integers, got ", describe(d));
      dims.push_back(d.get<uint64_t>());
    }
    for (const json& o : jo) {
      KVD_CHECK(o.is_number_unsigned(), where, ": data_offsets must be non-negative integers, got ", describe(o));
    }
    e.begin = jo[0].get<uint64_t>();
    e.end = jo[1].get<uint64_t>();
    KVD_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");

    uint64_t numel = 0, nbytes = 0;
    KVD_CHECK(shape_bytes(dims, dtype_size(e.view.dtype), &numel, &nbytes), where, ": shape ", js.dump(),
              " is too large");
    KVD_CHECK(nbytes == e.end - e.begin, where, ": length mismatch: shape ", js.dump(), " of ",
              dtype_name(e.view.dtype), " needs ", nbytes, " bytes, data_offsets [", e.begin, ", ", e.end,
              "] hold ", e.end - e.begin);
    for (uint64_t d : dims) e.view.shape.push_back(static_cast<int64_t>(d));  // each d <= numel <= INT64_MAX
    e.view.nbytes = static_cast<size_t>(nbytes);
    entries.push_back(std::move(e));
  }

  // The offsets must tile [0, buffer_len) exactly: sorted by (begin, end), each starts where the previous
  // ended. Zero-length tensors may sit anywhere on a boundary.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  const std::string* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < cursor) {
      KVD_FAIL(path, ": overlapping data_offsets for '", e.view.name, "' and '", *prev, "'");
    }
    if (e.begin > cursor) {
      KVD_FAIL(path, ": hole in data_offsets: bytes [", cursor, ", ", e.begin, ") before '", e.view.name,
               "' belong to no tensor");
    }
    cursor = e.end;
    prev = &e.view.name;
  }
  KVD_CHECK(cursor <= buffer_len, path, ": truncated: tensors need ", cursor, " buffer bytes, file has ",
            buffer_len);
  KVD_CHECK(cursor == buffer_len, path, ": ", buffer_len - cursor, " trailing bytes after the last tensor",
            " (data_offsets do not cover the buffer)");

  tensors_.reserve(entries.size());
  for (Entry& e : entries) {
    e.view.data = buffer + e.begin;
    index_[e.view.name] = tensors_.size();
    tensors_.push_back(std::move(e.view));
  }
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView& SafetensorsFile::at(const std::string& name) const {
  const TensorView* t = find(name);
  KVD_CHECK(t != nullptr, path(), ": tensor '", name, "' not found");
  return *t;
}

// ---- writer ------------------------------------------------------------------------------------------

void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::vector<PlannedTensor> planned = plan_tensors(path, tensors);
  const std::string header = build_header(path, planned, metadata);
  write_file_atomic(path, [&](std::ostream& os) {
    char len[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    os.write(len, 8);
    os.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const PlannedTensor& p : planned) {
      if (p.nbytes) os.write(static_cast<const char*>(p.ref->data), static_cast<std::streamsize>(p.nbytes));
    }
  });
}

void write_checkpoint(const std::string& dir, const std::vector<TensorRef>& tensors, size_t max_shard_bytes,
                      const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  KVD_CHECK(!ec, dir, ": cannot create directory (", ec.message(), ")");
  const fs::path root(dir);

  // Byte length of each tensor (validated again per shard by write_safetensors).
  (void)plan_tensors(dir, tensors);  // validates names, shapes and duplicates before anything is written
  std::vector<uint64_t> nbytes;
  uint64_t total = 0;
  for (const TensorRef& t : tensors) {
    uint64_t b = dtype_size(t.dtype);
    for (int64_t d : t.shape) b *= static_cast<uint64_t>(d);  // no overflow: checked by plan_tensors
    nbytes.push_back(b);
    KVD_CHECK(!__builtin_add_overflow(total, b, &total), dir, ": total checkpoint size overflows");
  }

  // Greedy packing in the caller's order (as HF does): a new shard starts when the next tensor would push
  // the current one past the limit; a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<TensorRef>> shards(1);
  uint64_t current = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!shards.back().empty() && current + nbytes[i] > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(tensors[i]);
    current += nbytes[i];
  }

  // One shard (everything fits, or a single oversized tensor): a plain model.safetensors, as HF writes.
  if (shards.size() == 1) {
    write_safetensors((root / kSingleFile).string(), tensors, metadata);
    remove_stale_weights(root, /*keep_single=*/true, {});
    return;
  }

  json weight_map = json::object();
  std::set<std::string> names;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file = shard_name(k + 1, shards.size());
    names.insert(file);
    write_safetensors((root / file).string(), shards[k], metadata);
    for (const TensorRef& t : shards[k]) weight_map[t.name] = file;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  // Like HF: json.dumps(index, indent=2, sort_keys=True) + "\n" (nlohmann objects are key-sorted).
  write_file_atomic((root / kIndexFile).string(), index.dump(2, ' ', /*ensure_ascii=*/true) + "\n");
  remove_stale_weights(root, /*keep_single=*/false, names);
}

// ---- checkpoints ---------------------------------------------------------------------------------------

Checkpoint::Checkpoint(const std::string& model_dir) : dir_(model_dir) {
  const fs::path root(model_dir);
  std::error_code ec;
  KVD_CHECK(fs::is_directory(root, ec), model_dir, ": not a directory");
  const fs::path single = root / kSingleFile;
  const fs::path index_path = root / kIndexFile;

  // Like transformers: a single model.safetensors wins over an index.
  if (fs::exists(single, ec)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const TensorView& t : files_.back()->tensors()) by_name_[t.name] = &t;
    return;
  }
  KVD_CHECK(fs::exists(index_path, ec), model_dir, ": no ", kSingleFile, " or ", kIndexFile,
            "; run `kvdistill convert` first");

  // Index: {"metadata": {...}, "weight_map": {tensor name: shard file}}.
  const std::string ipath = index_path.string();
  const std::string text = read_file(ipath);
  const json index = parse_json_strict(text.data(), text.data() + text.size(), ipath, 64);
  KVD_CHECK(index.is_object(), ipath, ": must be a JSON object");
  KVD_CHECK(index.contains("weight_map"), ipath, ": missing 'weight_map'");
  const json& wm = index["weight_map"];
  KVD_CHECK(wm.is_object(), ipath, ": 'weight_map' must be an object, got ", describe(wm));

  std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> tensor names in the index
  for (const auto& [name, file] : wm.items()) {
    KVD_CHECK(file.is_string(), ipath, ": weight_map entry '", name, "' must be a file name, got ", describe(file));
    const std::string f = file.get<std::string>();
    const fs::path fp(f);
    bool escapes = f.empty() || fp.is_absolute();
    for (const auto& part : fp) escapes = escapes || part == "..";
    KVD_CHECK(!escapes, ipath, ": weight_map entry '", name, "' names '", f, "', which is not a file in ", model_dir);
    by_shard[f].push_back(name);
  }
  KVD_CHECK(!by_shard.empty(), ipath, ": 'weight_map' is empty");

  // Open every shard; each must hold the tensors the index assigns to it.
  std::map<std::string, std::string> owner;  // tensor -> shard that holds it
  for (const auto& [file, listed] : by_shard) {
    const fs::path shard_path = root / file;
    KVD_CHECK(fs::is_regular_file(shard_path, ec), ipath, ": shard '", file, "' is missing (",
              shard_path.string(), ")");
    files_.push_back(std::make_unique<SafetensorsFile>(shard_path.string()));
    const SafetensorsFile& shard = *files_.back();
    for (const std::string& name : listed) {
      KVD_CHECK(shard.find(name) != nullptr, shard.path(), ": tensor '", name, "' is listed in ", kIndexFile,
                " but missing from this shard");
    }
    for (const TensorView& t : shard.tensors()) {
      auto [it, fresh] = owner.emplace(t.name, file);
      KVD_CHECK(fresh, model_dir, ": tensor '", t.name, "' is in two shards: ", it->second, " and ", file);
      by_name_[t.name] = &t;
    }
  }
  // Every tensor a shard holds must be the one the index maps (a stray copy means a broken index).
  for (const auto& [name, file] : owner) {
    KVD_CHECK(wm.contains(name) && wm[name].get<std::string>() == file, (root / file).string(), ": tensor '",
              name, "' is in this shard but not mapped to it in ", kIndexFile);
  }
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::at(const std::string& name) const {
  const TensorView* t = find(name);
  KVD_CHECK(t != nullptr, dir_, ": tensor '", name, "' not found");
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& kv : by_name_) out.push_back(kv.first);
  return out;
}

}  // namespace kvd
