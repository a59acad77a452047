// safetensors reader / writer / checkpoints against files written by the reference implementation
// (tests/oracles/safetensors_golden.py, the `safetensors` package).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "models/safetensors.h"
#include "test_paths.h"

namespace kvd {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kGolden = std::string(KVD_TESTDATA) + "/safetensors_golden";

json load_json(const std::string& path) { return json::parse(read_file(path)); }

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(std::stoul(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

// IEEE half -> float, written out (no library) so the test decodes F16 independently of the reader.
double half_to_double(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(mant, -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(1024 + mant, exp - 25);
  }
  return sign ? -v : v;
}

template <typename T>
T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the test machine is little-endian, like the format
  return v;
}

// A scratch directory unique to this process, under the build tree; removed when the tests end.
fs::path scratch_root() {
  return fs::path(KVD_TESTDATA) / "scratch" / ("test_safetensors." + std::to_string(::getpid()));
}
fs::path scratch(const std::string& name) {
  fs::path p = scratch_root() / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
struct RemoveScratch : ::testing::Environment {
  void TearDown() override { fs::remove_all(scratch_root()); }
};
[[maybe_unused]] ::testing::Environment* const remove_scratch = ::testing::AddGlobalTestEnvironment(new RemoveScratch);

// Tensors described by expected.json, with their bytes owned here.
struct OwnedTensors {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<TensorRef> refs;
};

OwnedTensors owned_from_expected(const json& desc) {
  OwnedTensors o;
  o.bytes.reserve(desc["tensors"].size());
  for (const json& t : desc["tensors"]) {
    o.bytes.push_back(from_hex(t["hex"].get<std::string>()));
    o.refs.push_back({t["name"].get<std::string>(), dtype_from_name(t["dtype"].get<std::string>(), "expected.json"),
                      t["shape"].get<std::vector<int64_t>>(), o.bytes.back().data()});
  }
  return o;
}

std::map<std::string, std::string> metadata_of(const json& desc) {
  return desc["metadata"].get<std::map<std::string, std::string>>();
}

// Checks one decoded element of `v` (at index i) against the oracle's value.
void expect_value(const TensorView& v, size_t i, const json& want) {
  const uint8_t* p = v.data + i * dtype_size(v.dtype);
  SCOPED_TRACE(v.name + "[" + std::to_string(i) + "]");
  switch (v.dtype) {
    case DType::F32: EXPECT_EQ(double(load_le<float>(p)), want.get<double>()); break;
    case DType::F64: EXPECT_EQ(load_le<double>(p), want.get<double>()); break;
    case DType::F16: EXPECT_EQ(half_to_double(load_le<uint16_t>(p)), want.get<double>()); break;
    case DType::BF16: {
      const uint32_t bits = uint32_t(load_le<uint16_t>(p)) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      EXPECT_EQ(double(f), want.get<double>());
      break;
    }
    case DType::BOOL:
      EXPECT_TRUE(*p == 0 || *p == 1);
      EXPECT_EQ(*p == 1, want.get<bool>());
      break;
    case DType::U8: EXPECT_EQ(uint64_t(*p), want.get<uint64_t>()); break;
    case DType::I8: EXPECT_EQ(int64_t(load_le<int8_t>(p)), want.get<int64_t>()); break;
    case DType::I16: EXPECT_EQ(int64_t(load_le<int16_t>(p)), want.get<int64_t>()); break;
    case DType::U16: EXPECT_EQ(uint64_t(load_le<uint16_t>(p)), want.get<uint64_t>()); break;
    case DType::I32: EXPECT_EQ(int64_t(load_le<int32_t>(p)), want.get<int64_t>()); break;
    case DType::U32: EXPECT_EQ(uint64_t(load_le<uint32_t>(p)), want.get<uint64_t>()); break;
    case DType::I64: EXPECT_EQ(load_le<int64_t>(p), want.get<int64_t>()); break;
    case DType::U64: EXPECT_EQ(load_le<uint64_t>(p), want.get<uint64_t>()); break;
    default: ADD_FAILURE() << "no decoder for " << dtype_name(v.dtype);
  }
}

// Every tensor of `desc` is in `f` with the right dtype, shape, bytes and decoded values.
void expect_matches(const SafetensorsFile& f, const json& desc) {
  ASSERT_EQ(f.tensors().size(), desc["tensors"].size());
  EXPECT_EQ(f.metadata(), metadata_of(desc));
  for (const json& t : desc["tensors"]) {
    const std::string name = t["name"].get<std::string>();
    SCOPED_TRACE(name);
    const TensorView* v = f.find(name);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->name, name);
    EXPECT_EQ(dtype_name(v->dtype), t["dtype"].get<std::string>());
    EXPECT_EQ(v->shape, t["shape"].get<std::vector<int64_t>>());
    const std::vector<uint8_t> want = from_hex(t["hex"].get<std::string>());
    ASSERT_EQ(v->nbytes, want.size());
    EXPECT_EQ(size_t(v->numel()) * dtype_size(v->dtype), v->nbytes);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), v->data));
    if (!t["values"].is_null()) {
      ASSERT_EQ(t["values"].size(), size_t(v->numel()));
      for (size_t i = 0; i < t["values"].size(); ++i) expect_value(*v, i, t["values"][i]);
    }
  }
}

// Runs `fn`, which must throw kvd::Error mentioning `path` and `needle`.
template <typename Fn>
void expect_error(Fn fn, const std::string& path, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error for " << path << " (expected: " << needle << ")";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "path missing from: " << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "'" << needle << "' missing from: " << msg;
  }
}

// ---- dtypes -------------------------------------------------------------------------------------------

TEST(SafetensorsDType, NamesSizesAndParsing) {
  const std::vector<std::pair<std::string, size_t>> all = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  for (const auto& [name, size] : all) {
    const DType d = dtype_from_name(name, "ctx");
    EXPECT_STREQ(dtype_name(d), name.c_str());
    EXPECT_EQ(dtype_size(d), size) << name;
  }
  expect_error([] { dtype_from_name("bf16", "somewhere.json"); }, "somewhere.json", "unknown dtype 'bf16'");
}

// ---- reading reference files ----------------------------------------------------------------------------

TEST(SafetensorsRead, ReferenceFileEveryValue) {
  const json expected = load_json(kGolden + "/expected.json");
  SafetensorsFile f(kGolden + "/basic.safetensors");
  EXPECT_EQ(f.path(), kGolden + "/basic.safetensors");
  expect_matches(f, expected["basic.safetensors"]);

  // tensors() is in file order: each starts where the previous ended, from the end of the header.
  const uint8_t* expect_at = f.tensors().front().data;
  for (const TensorView& v : f.tensors()) {
    EXPECT_EQ(v.data, expect_at) << v.name;
    expect_at += v.nbytes;
  }
  EXPECT_EQ(f.tensors().front().name, "u64");  // U64 is first in the reference order
  EXPECT_EQ(f.tensors().back().name, "bool.mask");

  EXPECT_EQ(f.find("nope"), nullptr);
  expect_error([&] { f.at("nope"); }, f.path(), "tensor 'nope' not found");
  EXPECT_EQ(f.at("scalar.f64").shape, std::vector<int64_t>{});
  EXPECT_EQ(f.at("scalar.f64").numel(), 1);
  EXPECT_EQ(f.at("empty.mid").numel(), 0);
}

TEST(SafetensorsRead, EmptyAndMultiKeyMetadata) {
  const json expected = load_json(kGolden + "/expected.json");
  SafetensorsFile empty(kGolden + "/empty.safetensors");
  EXPECT_TRUE(empty.tensors().empty());
  EXPECT_TRUE(empty.metadata().empty());
  SafetensorsFile meta(kGolden + "/meta.safetensors");
  expect_matches(meta, expected["meta.safetensors"]);
}

// ---- writing: byte-identical to the reference ------------------------------------------------------------

TEST(SafetensorsWrite, BytesIdenticalToReference) {
  const json expected = load_json(kGolden + "/expected.json");
  const fs::path dir = scratch("identical");
  for (const char* name : {"basic.safetensors", "empty.safetensors"}) {
    SCOPED_TRACE(name);
    const json& desc = expected[name];
    OwnedTensors t = owned_from_expected(desc);  // in the oracle's (unsorted) order
    const std::string ours = (dir / name).string();
    write_safetensors(ours, t.refs, metadata_of(desc));
    const std::string a = read_file(ours), b = read_file(kGolden + "/" + name);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_TRUE(a == b) << "header ours:\n" << a.substr(8, 400) << "\nreference:\n" << b.substr(8, 400);
  }
}

// The reference orders several metadata keys randomly (a hash map); ours sorts them. Everything else
// (header length, tensor entries, buffer) must still agree.
TEST(SafetensorsWrite, MultiKeyMetadataMatchesReferenceUpToKeyOrder) {
  const json expected = load_json(kGolden + "/expected.json");
  const json& desc = expected["meta.safetensors"];
  OwnedTensors t = owned_from_expected(desc);
  const std::string ours = (scratch("meta") / "meta.safetensors").string();
  write_safetensors(ours, t.refs, metadata_of(desc));
  const std::string a = read_file(ours), b = read_file(kGolden + "/meta.safetensors");
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(a.substr(0, 8), b.substr(0, 8));  // same header length
  uint64_t n = 0;
  std::memcpy(&n, a.data(), 8);
  EXPECT_EQ(a.substr(8 + n), b.substr(8 + n));  // same buffer
  json ha = json::parse(a.substr(8, n)), hb = json::parse(b.substr(8, n));
  EXPECT_EQ(ha, hb);  // same content (nlohmann compares objects by key)
  EXPECT_EQ(a.find("\"__metadata__\":{\"a key\":\"1\",\"format\":\"pt\","), 8 + 1) << a.substr(8, n);
}

TEST(SafetensorsWrite, HeaderPaddedAndSorted) {
  // Same dtype sorts by name (bytewise); higher dtype first; header length a multiple of 8.
  const float f[3] = {1, 2, 3};
  const int64_t i[1] = {7};
  const uint8_t u[2] = {1, 2};
  const fs::path dir = scratch("sorted");
  const std::string path = (dir / "s.safetensors").string();
  write_safetensors(path, {{"zz", DType::F32, {1}, f}, {"u", DType::U8, {2}, u}, {"a", DType::F32, {2}, f + 1},
                           {"i", DType::I64, {}, i}});
  const std::string s = read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, s.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = s.substr(8, n);
  EXPECT_EQ(header.substr(0, header.find_last_not_of(' ') + 1),
            R"({"i":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
            R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
            R"("zz":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},)"
            R"("u":{"dtype":"U8","shape":[2],"data_offsets":[20,22]}})");
  EXPECT_EQ(s.size(), 8 + n + 22);
}

TEST(SafetensorsWrite, RoundTripEveryDType) {
  std::mt19937 rng(42);
  const std::vector<DType> dtypes = {DType::BOOL, DType::U8,  DType::I8,  DType::F8_E5M2, DType::F8_E4M3,
                                     DType::I16,  DType::U16, DType::F16, DType::BF16,    DType::I32,
                                     DType::U32,  DType::F32, DType::F64, DType::I64,     DType::U64};
  const std::vector<std::vector<int64_t>> shapes = {{}, {1}, {19}, {3, 7}, {2, 0, 5}, {1, 1, 1, 3}};
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<TensorRef> refs;
  bytes.reserve(dtypes.size() * shapes.size());
  for (DType d : dtypes) {
    for (size_t s = 0; s < shapes.size(); ++s) {
      int64_t numel = 1;
      for (int64_t x : shapes[s]) numel *= x;
      std::vector<uint8_t> b(size_t(numel) * dtype_size(d));
      for (auto& x : b) x = d == DType::BOOL ? rng() & 1 : rng() & 0xff;
      bytes.push_back(std::move(b));
      refs.push_back({std::string(dtype_name(d)) + "/" + std::to_string(s), d, shapes[s], bytes.back().data()});
    }
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"k\"\n\x01", "v\\é"}};
  const std::string path = (scratch("roundtrip") / "r.safetensors").string();
  write_safetensors(path, refs, meta);
  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), refs.size());
  for (size_t k = 0; k < refs.size(); ++k) {
    const TensorView& v = f.at(refs[k].name);
    EXPECT_EQ(v.dtype, refs[k].dtype);
    EXPECT_EQ(v.shape, refs[k].shape);
    ASSERT_EQ(v.nbytes, bytes[k].size());
    EXPECT_TRUE(std::equal(bytes[k].begin(), bytes[k].end(), v.data)) << refs[k].name;
  }
}

TEST(SafetensorsWrite, RejectsBadInput) {
  const fs::path dir = scratch("reject");
  const std::string path = (dir / "x.safetensors").string();
  const float f[2] = {1, 2};
  expect_error([&] { write_safetensors(path, {{"a", DType::F32, {2}, f}, {"a", DType::F32, {1}, f}}); }, path,
               "duplicate tensor name 'a'");
  expect_error([&] { write_safetensors(path, {{"a", DType::F32, {-1}, f}}); }, path, "negative dimension");
  expect_error([&] { write_safetensors(path, {{"__metadata__", DType::F32, {1}, f}}); }, path, "reserved");
  expect_error([&] { write_safetensors(path, {{"a", DType::F32, {1}, nullptr}}); }, path, "has no data");
  expect_error([&] { write_safetensors(path, {{"a", DType::F32, {int64_t(1) << 62, 8}, f}}); }, path, "too large");
  expect_error([&] { write_safetensors(path, {{"a\xff", DType::F32, {1}, f}}); }, path, "UTF-8");
  EXPECT_FALSE(fs::exists(path));  // nothing written, no temporary left behind
  EXPECT_TRUE(fs::is_empty(dir));
}

// ---- corrupt inputs ---------------------------------------------------------------------------------------

TEST(SafetensorsCorrupt, EveryVariantNamesPathAndProblem) {
  const json corrupt = load_json(kGolden + "/corrupt.json");
  ASSERT_GE(corrupt.size(), 30u);
  for (const auto& [rel, needle] : corrupt.items()) {
    SCOPED_TRACE(rel);
    const std::string path = kGolden + "/" + rel;
    if (rel.rfind("corrupt/", 0) == 0) {
      expect_error([&] { SafetensorsFile f(path); }, path, needle.get<std::string>());
      // The message starts with the path.
      try {
        SafetensorsFile f(path);
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).rfind(path + ": ", 0), 0u) << e.what();
      }
    } else {
      expect_error([&] { Checkpoint c(path); }, path, needle.get<std::string>());
    }
  }
}

TEST(SafetensorsCorrupt, EmptyFileAndMissingFile) {
  const fs::path dir = scratch("empty");
  const std::string empty = (dir / "zero.safetensors").string();
  std::ofstream(empty).close();
  expect_error([&] { SafetensorsFile f(empty); }, empty, "truncated");
  const std::string missing = (dir / "missing.safetensors").string();
  expect_error([&] { SafetensorsFile f(missing); }, missing, "cannot open");
}

// Random damage to a valid file: the reader either accepts it (with every view inside the file) or throws
// kvd::Error; it never crashes or reads out of bounds.
TEST(SafetensorsCorrupt, RandomMutationsNeverCrash) {
  const std::string good = read_file(kGolden + "/basic.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, good.data(), 8);
  const fs::path dir = scratch("fuzz");
  std::mt19937 rng(2024);
  int accepted = 0, rejected = 0;
  for (int iter = 0; iter < 600; ++iter) {
    std::string s = good;
    switch (iter % 4) {
      case 0:  // flip header bytes
        for (int k = 0; k < 1 + int(rng() % 4); ++k) s[8 + rng() % n] = char(rng() & 0xff);
        break;
      case 1:  // replace a digit in the header
        for (int k = 0; k < 3; ++k) {
          size_t pos = 8 + rng() % n;
          if (std::isdigit(static_cast<unsigned char>(s[pos]))) s[pos] = char('0' + rng() % 10);
        }
        break;
      case 2:  // truncate anywhere
        s.resize(rng() % s.size());
        break;
      case 3:  // damage the length prefix
        s[rng() % 8] = char(rng() & 0xff);
        break;
    }
    const std::string path = (dir / ("m" + std::to_string(iter % 8) + ".safetensors")).string();
    write_file_atomic(path, s);
    try {
      SafetensorsFile f(path);
      ++accepted;
      // Accepted: the views tile the buffer after the (mutated) header and hold exactly its bytes.
      uint64_t n2 = 0;
      std::memcpy(&n2, s.data(), 8);
      size_t offset = 0;
      for (const TensorView& v : f.tensors()) {
        ASSERT_LE(8 + n2 + offset + v.nbytes, s.size());
        EXPECT_EQ(std::memcmp(v.data, s.data() + 8 + n2 + offset, v.nbytes), 0) << v.name;
        offset += v.nbytes;
      }
      EXPECT_EQ(8 + n2 + offset, s.size());
    } catch (const Error& e) {
      ++rejected;
      EXPECT_EQ(std::string(e.what()).rfind(path, 0), 0u) << e.what();
    }
  }
  EXPECT_GT(rejected, 100);
  EXPECT_GT(accepted, 0);  // e.g. digit changes inside values that keep the layout consistent
}

// ---- checkpoints --------------------------------------------------------------------------------------------

void expect_checkpoint(const Checkpoint& ck, const json& tensors, bool by_sha) {
  std::vector<std::string> want_names;
  for (const auto& [name, t] : tensors.items()) {
    SCOPED_TRACE(name);
    want_names.push_back(name);
    const TensorView& v = ck.at(name);
    EXPECT_EQ(dtype_name(v.dtype), t["dtype"].get<std::string>());
    EXPECT_EQ(v.shape, t["shape"].get<std::vector<int64_t>>());
    if (by_sha) {
      EXPECT_EQ(sha256_hex(v.data, v.nbytes), t["sha256"].get<std::string>());
    } else {
      const std::vector<uint8_t> want = from_hex(t["hex"].get<std::string>());
      ASSERT_EQ(v.nbytes, want.size());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), v.data));
    }
  }
  EXPECT_EQ(ck.names(), want_names);  // json objects iterate sorted, like names()
}

TEST(Checkpoint, ReadsReferenceShards) {
  const json expected = load_json(kGolden + "/expected.json");
  Checkpoint hand(kGolden + "/sharded");
  EXPECT_EQ(hand.dir(), kGolden + "/sharded");
  expect_checkpoint(hand, expected["sharded"]["tensors"], false);
  Checkpoint hf(kGolden + "/sharded_hf");
  expect_checkpoint(hf, expected["sharded_hf"]["tensors"], true);
  expect_error([&] { hf.at("model.nope"); }, kGolden + "/sharded_hf", "tensor 'model.nope' not found");
  EXPECT_EQ(hf.find("model.nope"), nullptr);
}

TEST(Checkpoint, WriteSingleThenShardedThenSingle) {
  // 5 tensors of 40, 40, 24, 100, 8 bytes.
  std::vector<std::vector<float>> data = {std::vector<float>(10, 1.f), std::vector<float>(10, 2.f),
                                          std::vector<float>(6, 3.f), std::vector<float>(25, 4.f),
                                          std::vector<float>(2, 5.f)};
  std::vector<TensorRef> refs;
  const char* names[] = {"e.w", "d.w", "c.w", "b.w", "a.w"};
  for (size_t i = 0; i < data.size(); ++i) refs.push_back({names[i], DType::F32, {int64_t(data[i].size())}, data[i].data()});
  const fs::path dir = scratch("ckpt");
  const std::map<std::string, std::string> meta = {{"format", "pt"}};

  auto check_contents = [&](const Checkpoint& ck) {
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a.w", "b.w", "c.w", "d.w", "e.w"}));
    for (size_t i = 0; i < data.size(); ++i) {
      const TensorView& v = ck.at(names[i]);
      ASSERT_EQ(v.nbytes, data[i].size() * 4);
      EXPECT_EQ(std::memcmp(v.data, data[i].data(), v.nbytes), 0) << names[i];
    }
  };

  write_checkpoint(dir.string(), refs, 212, meta);  // total 212 bytes fits: one file
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  check_contents(Checkpoint(dir.string()));

  // Limit 90: greedy in caller order -> [e, d] (80), [c] (24; +100 > 90), [b] (100 alone), [a].
  write_checkpoint(dir.string(), refs, 90, meta);
  EXPECT_FALSE(fs::exists(dir / "model.safetensors")) << "a stale single file would shadow the shards";
  const json index = load_json((dir / "model.safetensors.index.json").string());
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), 212u);
  const json want_map = {{"e.w", "model-00001-of-00004.safetensors"}, {"d.w", "model-00001-of-00004.safetensors"},
                         {"c.w", "model-00002-of-00004.safetensors"}, {"b.w", "model-00003-of-00004.safetensors"},
                         {"a.w", "model-00004-of-00004.safetensors"}};
  EXPECT_EQ(index["weight_map"], want_map);
  // Like HF's json.dumps(indent=2, sort_keys=True).
  EXPECT_EQ(read_file((dir / "model.safetensors.index.json").string()).substr(0, 40),
            "{\n  \"metadata\": {\n    \"total_size\": 212\n");
  for (int k = 1; k <= 4; ++k) {
    SafetensorsFile shard((dir / ("model-0000" + std::to_string(k) + "-of-00004.safetensors")).string());
    EXPECT_EQ(shard.metadata(), meta);
  }
  check_contents(Checkpoint(dir.string()));

  write_checkpoint(dir.string(), refs, 1000, meta);  // back to one file: the shards and index go
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(e.path().filename(), "model.safetensors");
  }
  EXPECT_EQ(files, 1u);
  check_contents(Checkpoint(dir.string()));
}

TEST(Checkpoint, OneOversizedTensorIsASingleFile) {
  const std::vector<float> big(100, 1.f);
  const fs::path dir = scratch("oversized");
  write_checkpoint(dir.string(), {{"w", DType::F32, {100}, big.data()}}, 10);
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_EQ(Checkpoint(dir.string()).at("w").nbytes, 400u);
}

TEST(Checkpoint, MissingDirectory) {
  const std::string nope = kGolden + "/does_not_exist";
  expect_error([&] { Checkpoint c(nope); }, nope, "not a directory");
}

}  // namespace
}  // namespace kvd
