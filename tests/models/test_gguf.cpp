// GGUF reader, dequantization and `convert` against independent references written by
// tests/oracles/gguf_golden.py: the `gguf` package (llama.cpp's Python reader, writer and dequantizers),
// transformers' GGUF import (load_gguf_checkpoint: dequantization + Q/K un-permutation) and `tokenizers`.
//
// Tolerance: dequantized values must be bit-identical. Both sides compute in float32 with one rounding per
// multiply and per add in the same order (numpy's elementwise ops; gguf.cpp disables FMA contraction), and
// fp16 / bf16 -> fp32 is exact, so there is nothing to tolerate. Un-permuting and converting only move floats.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "models/config.h"
#include "models/convert.h"
#include "models/gguf.h"
#include "models/safetensors.h"
#include "test_paths.h"

namespace kvd {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kGolden = std::string(KVD_TESTDATA) + "/gguf_golden";

json load_json(const std::string& path) { return json::parse(read_file(path)); }

// A scratch directory under the build tree, removed at the end of the test unless the test failed (the
// converted SmolLM2 alone is 540 MB).
struct Scratch {
  fs::path path;
  explicit Scratch(const std::string& name)
      : path(fs::path(KVD_TESTDATA) / "scratch" / ("test_gguf." + std::to_string(::getpid())) / name) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() {
    if (!::testing::Test::HasFailure()) {
      std::error_code ec;
      fs::remove_all(path, ec);
      fs::remove(path.parent_path(), ec);  // only if empty
    }
  }
};

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream o(p, std::ios::binary | std::ios::trunc);
  o.write(bytes.data(), std::streamsize(bytes.size()));
}

// The message of the kvd::Error that `fn` throws ("" and a test failure if it throws nothing or
// something else).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-kvd exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

// Bitwise comparison of float tensors, with the worst difference in the failure message.
void expect_same_floats(const float* got, const float* want, size_t n, const std::string& what) {
  if (std::memcmp(got, want, n * sizeof(float)) == 0) return;
  size_t bad = 0, first = n;
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t a, b;
    std::memcpy(&a, got + i, 4);
    std::memcpy(&b, want + i, 4);
    if (a == b) continue;
    ++bad;
    if (first == n) first = i;
    worst = std::max(worst, double(std::fabs(got[i] - want[i])));
  }
  ADD_FAILURE() << what << ": " << bad << " of " << n << " values differ; first at " << first << " (got "
                << got[first] << ", want " << want[first] << "), max |diff| " << worst;
}

const float* as_floats(const TensorView& v) {
  EXPECT_EQ(v.dtype, DType::F32) << v.name;
  return reinterpret_cast<const float*>(v.data);
}

// Runs the oracle's check mode on a converted directory; true if every check passed.
bool python_check(const std::string& dir, const std::string& kind) {
  std::string py = read_file(kGolden + "/python.txt");
  while (!py.empty() && (py.back() == '\n' || py.back() == ' ')) py.pop_back();
  const std::string cmd = "'" + py + "' '" + std::string(KVD_SOURCE_DIR) + "/tests/oracles/gguf_golden.py' --out '" +
                          kGolden + "' --gguf '" + KVD_GGUF + "' --kind " + kind + " --check-converted '" + dir +
                          "' 2>&1";
  std::printf("running: %s\n", cmd.c_str());
  std::fflush(stdout);
  const int rc = std::system(cmd.c_str());
  return rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 0;
}

// ------------------------------------------------------------------------------------------------
// Reader
// ------------------------------------------------------------------------------------------------
TEST(GgufReader, RealModelHeaderMetadataAndTensorInfos) {
  GgufFile f(KVD_GGUF);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.metadata().size(), 33u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.get_int("llama.embedding_length"), 576);
  EXPECT_EQ(f.get_int("llama.attention.head_count"), 9);
  EXPECT_EQ(f.get_int("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(f.at("llama.rope.freq_base").type, GgufType::F32);
  EXPECT_EQ(f.get_double("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(f.get_double("llama.attention.layer_norm_rms_epsilon"), double(1e-5f));
  EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "smollm");
  EXPECT_FALSE(f.get_bool_or("tokenizer.ggml.add_bos_token", true));
  const auto& tokens = f.at("tokenizer.ggml.tokens").as_strings();
  ASSERT_EQ(tokens.size(), 49152u);
  EXPECT_EQ(tokens[1], "<|im_start|>");
  EXPECT_EQ(f.at("tokenizer.ggml.merges").as_strings().size(), 48900u);
  EXPECT_EQ(f.at("tokenizer.ggml.merges").as_strings()[0], "Ġ t");
  const std::vector<int64_t> types = f.at("tokenizer.ggml.token_type").as_ints();
  EXPECT_EQ(std::count(types.begin(), types.end(), 3), 17);
  EXPECT_NE(f.get_string("tokenizer.chat_template").find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(f.get_int_or("no.such.key", -7), -7);
  EXPECT_NE(error_of([&] { f.at("no.such.key"); }).find(std::string(KVD_GGUF) + ": metadata key 'no.such.key'"),
            std::string::npos);

  // Tensor infos against gguf's GGUFReader.
  const json info = load_json(kGolden + "/real_info.json");
  ASSERT_EQ(f.tensors().size(), info.size());
  for (const GgufTensor& t : f.tensors()) {
    SCOPED_TRACE(t.name);
    ASSERT_TRUE(info.contains(t.name));
    const json& e = info[t.name];
    EXPECT_EQ(ggml_type_name(t.type), e["type"].get<std::string>());
    EXPECT_EQ(t.shape(), e["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(f.data_offset() + t.offset, e["offset"].get<uint64_t>());
  }
  EXPECT_EQ(f.tensor("blk.0.attn_q.weight").type, GgmlType::Q4_1);
  EXPECT_EQ(f.tensor("token_embd.weight").type, GgmlType::Q8_0);
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr);  // tied embeddings
}

TEST(GgufReader, SyntheticMetadataOfEveryValueType) {
  const std::string path = kGolden + "/synthetic.gguf";
  GgufFile f(path);
  EXPECT_EQ(f.alignment(), 64u);
  const std::map<std::string, GgufType> names = {
      {"u8", GgufType::U8},   {"i8", GgufType::I8},     {"u16", GgufType::U16},      {"i16", GgufType::I16},
      {"u32", GgufType::U32}, {"i32", GgufType::I32},   {"u64", GgufType::U64},      {"i64", GgufType::I64},
      {"f32", GgufType::F32}, {"f64", GgufType::F64},   {"bool", GgufType::BOOL},    {"string", GgufType::STRING}};
  const json meta = load_json(kGolden + "/synthetic_meta.json");
  size_t checked = 0;
  for (const json& m : meta) {
    const std::string key = m["key"], type = m["type"];
    SCOPED_TRACE(key + " (" + type + ")");
    const GgufValue& v = f.at(key);
    const json& want = m["value"];
    if (type.rfind("array[", 0) == 0) {
      ASSERT_EQ(v.type, GgufType::ARRAY);
      const std::string et = type.substr(6, type.size() - 7);
      ASSERT_EQ(v.elem_type, names.at(et));
      ASSERT_EQ(v.size(), want.size());
      if (et == "string") {
        EXPECT_EQ(v.as_strings(), want.get<std::vector<std::string>>());
      } else if (et == "f32" || et == "f64") {
        EXPECT_EQ(v.as_doubles(), want.get<std::vector<double>>());
      } else if (et == "bool") {
        const std::vector<int64_t> got = v.as_ints();
        for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i] != 0, want[i].get<bool>());
      } else if (et == "u64") {
        for (size_t i = 0; i < v.elems.size(); ++i) EXPECT_EQ(v.elems[i], want[i].get<uint64_t>());
      } else {
        EXPECT_EQ(v.as_ints(), want.get<std::vector<int64_t>>());
      }
    } else {
      ASSERT_EQ(v.type, names.at(type));
      if (type == "string") {
        EXPECT_EQ(v.as_string(), want.get<std::string>());
      } else if (type == "bool") {
        EXPECT_EQ(v.as_bool(), want.get<bool>());
      } else if (type == "f32" || type == "f64") {
        EXPECT_EQ(v.as_double(), want.get<double>());
      } else if (type == "u64") {
        EXPECT_EQ(v.bits, want.get<uint64_t>());
      } else {
        EXPECT_EQ(v.as_int(), want.get<int64_t>());
      }
    }
    ++checked;
  }
  EXPECT_EQ(checked, meta.size());
  EXPECT_GE(checked, 25u);
  // Type errors name the file and the key.
  EXPECT_NE(error_of([&] { f.at("test.u8").as_string(); }).find(path + ": metadata 'test.u8': expected a string"),
            std::string::npos);
  EXPECT_NE(error_of([&] { f.at("test.u64").as_int(); }).find("does not fit in int64"), std::string::npos);
  EXPECT_NE(error_of([&] { f.at("test.arr_str").as_ints(); }).find("array of string"), std::string::npos);
  EXPECT_EQ(f.at("test.i8").as_double(), -100.0);
}

TEST(GgufReader, HandAssembledSmallFile) {
  const std::string path = kGolden + "/small.gguf";
  GgufFile f(path);
  EXPECT_EQ(f.metadata().size(), 4u);
  EXPECT_EQ(f.get_int("small.count"), 7);
  EXPECT_EQ(f.at("small.words").as_strings(), (std::vector<std::string>{"x", "yy", ""}));
  EXPECT_EQ(f.at("small.empty").size(), 0u);
  EXPECT_EQ(f.at("small.empty").elem_type, GgufType::I32);
  SafetensorsFile want(kGolden + "/small_expected.safetensors");
  ASSERT_EQ(f.tensors().size(), 2u);
  for (const GgufTensor& t : f.tensors()) {
    const TensorView& w = want.at(t.name);
    EXPECT_EQ(t.shape(), w.shape);
    const std::vector<float> got = f.dequantize(t);
    expect_same_floats(got.data(), as_floats(w), got.size(), t.name);
  }
}

// Every corruption gives a kvd::Error that names the file and the problem.
TEST(GgufReader, CorruptFilesFailWithPathAndReason) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bad_magic", "not a GGUF file"},
      {"version1", "GGUF version 1 is not supported"},
      {"version2", "GGUF version 2 is not supported"},
      {"version4", "unknown GGUF version 4"},
      {"big_endian", "big-endian"},
      {"empty", "not a GGUF file"},
      {"truncated_header", "truncated in the header"},
      {"truncated_kv", "truncated in metadata entry 2 ('small.words')"},
      {"truncated_tensor_info", "truncated in tensor info 1"},
      {"truncated_data", "tensor 'b' (Q8_0, 68 bytes at data offset 64) extends past the end of the file"},
      {"offset_past_eof", "tensor 'b' (Q8_0, 68 bytes at data offset 1099511627776) extends past the end"},
      {"absurd_string_length", "metadata entry 1: key length 4611686018427387904 exceeds"},
      {"absurd_array_length", "array length 2305843009213693952 exceeds"},
      {"absurd_numeric_array", "array length 1152921504606846976 exceeds"},
      {"huge_kv_count", "claims 1152921504606846976 metadata entries"},
      {"huge_tensor_count", "claims 1152921504606846976 tensors"},
      {"unknown_tensor_type", "tensor 'b': unknown tensor type 77"},
      {"unknown_value_type", "unknown value type 13"},
      {"bad_n_dims", "n_dims 5 is outside 1..4"},
      {"dims_overflow", "dims overflow"},
      {"misaligned_offset", "data offset 52 is not a multiple of the alignment 32"},
      {"bad_alignment", "general.alignment 48 is not a power of two"},
      {"duplicate_key", "duplicate metadata key 'small.count'"},
      {"duplicate_tensor", "duplicate tensor name 'a'"},
      {"nested_array", "nested arrays are not supported"},
      {"bad_block_multiple", "row length 33 is not a multiple of the Q8_0 block size 32"},
  };
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(kGolden + "/corrupt")) files += e.path().extension() == ".gguf";
  EXPECT_EQ(files, cases.size()) << "every corrupt file of the oracle has a case here";
  for (const auto& [name, reason] : cases) {
    SCOPED_TRACE(name);
    const std::string path = kGolden + "/corrupt/" + name + ".gguf";
    ASSERT_TRUE(fs::exists(path));
    const std::string msg = error_of([&] { GgufFile f(path); });
    EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(reason), std::string::npos) << msg;
  }
}

// Cutting a valid file anywhere must fail cleanly (the last tensor's data ends at the end of the file).
TEST(GgufReader, EveryTruncationFails) {
  const std::string good = read_file(kGolden + "/small.gguf");
  const Scratch s("truncations");
  const fs::path& dir = s.path;
  for (size_t len = 0; len < good.size(); ++len) {
    const std::string path = (dir / ("cut" + std::to_string(len) + ".gguf")).string();
    write_bytes(path, good.substr(0, len));
    const std::string msg = error_of([&] { GgufFile f(path); });
    EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << "length " << len << ": " << msg;
    fs::remove(path);
  }
  const std::string path = (dir / "whole.gguf").string();
  write_bytes(path, good);
  EXPECT_NO_THROW(GgufFile f(path));
}

// Random byte flips in the header, metadata and tensor infos: the reader either accepts the file (and then
// dequantizing any tensor stays in bounds) or throws kvd::Error; nothing else (no crash, no bad_alloc).
TEST(GgufReader, FuzzedFilesNeverReadOutOfBounds) {
  const Scratch s("fuzz");
  const fs::path& dir = s.path;
  std::mt19937_64 rng(12345);
  int accepted = 0, rejected = 0;
  for (const char* seed_name : {"small.gguf", "synthetic.gguf"}) {
    const std::string good = read_file(kGolden + "/" + seed_name);
    GgufFile seed(kGolden + "/" + seed_name);
    const size_t header_end = seed.data_offset();  // mutate the structured part only
    for (int iter = 0; iter < 1500; ++iter) {
      std::string bytes = good;
      const int flips = 1 + int(rng() % 4);
      for (int k = 0; k < flips; ++k) {
        const size_t pos = rng() % header_end;
        switch (rng() % 3) {
          case 0: bytes[pos] = char(rng()); break;                 // random byte
          case 1: bytes[pos] = char(bytes[pos] ^ (1 << (rng() % 8))); break;  // one bit
          default: bytes[pos] = char(0xFF); break;                 // a large length / count
        }
      }
      if (rng() % 8 == 0) bytes.resize(rng() % bytes.size());
      const std::string path = (dir / "fuzz.gguf").string();
      write_bytes(path, bytes);
      try {
        GgufFile f(path);
        for (const GgufTensor& t : f.tensors()) {
          const GgmlTypeInfo* info = ggml_type_info(uint32_t(t.type));
          ASSERT_NE(info, nullptr);
          ASSERT_LE(f.data_offset() + t.offset + t.nbytes, bytes.size()) << t.name;  // inside the file
          if (info->dequantizable && t.numel() <= (int64_t(1) << 22)) (void)f.dequantize(t);
        }
        ++accepted;
      } catch (const Error& e) {
        ++rejected;
        ASSERT_EQ(std::string(e.what()).rfind(path + ": ", 0), 0u) << e.what();
      } catch (const std::exception& e) {
        FAIL() << "iteration " << iter << " of " << seed_name << ": non-kvd exception " << e.what();
      }
    }
  }
  std::printf("fuzz: %d accepted, %d rejected\n", accepted, rejected);
  EXPECT_GT(rejected, 100);
}

// ------------------------------------------------------------------------------------------------
// Dequantization
// ------------------------------------------------------------------------------------------------

// All 65536 halves against a formula written here (ldexp), independent of the bit manipulation in gguf.cpp.
TEST(GgufDequant, EveryHalfConvertsExactly) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
    double want;
    if (exp == 0)
      want = std::ldexp(double(mant), -24);
    else if (exp == 31)
      want = mant ? NAN : INFINITY;
    else
      want = std::ldexp(double(1024 + mant), exp - 25);
    if (sign) want = -want;
    const float got = fp16_to_fp32(uint16_t(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      EXPECT_EQ(double(got), want) << h;
      EXPECT_EQ(std::signbit(got), bool(sign)) << h;
    }
  }
  EXPECT_EQ(bf16_to_fp32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_fp32(0xC040), -3.0f);
}

TEST(GgufDequant, SyntheticEveryTypeAndRowCount) {
  GgufFile f(kGolden + "/synthetic.gguf");
  SafetensorsFile want(kGolden + "/synthetic_expected.safetensors");
  std::set<std::string> types;
  ASSERT_EQ(f.tensors().size(), want.tensors().size());
  for (const GgufTensor& t : f.tensors()) {
    SCOPED_TRACE(t.name + " " + ggml_type_name(t.type));
    const TensorView& w = want.at(t.name);
    EXPECT_EQ(t.shape(), w.shape);
    ASSERT_EQ(t.numel(), w.numel());
    const std::vector<float> got = f.dequantize(t);
    expect_same_floats(got.data(), as_floats(w), got.size(), t.name);
    types.insert(ggml_type_name(t.type));
  }
  EXPECT_EQ(types, (std::set<std::string>{"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                                          "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}));
}

TEST(GgufDequant, SmolLM2EveryTensorMatchesGguf) {
  GgufFile f(KVD_GGUF);
  SafetensorsFile want(kGolden + "/real_dequant.safetensors");
  ASSERT_EQ(f.tensors().size(), want.tensors().size());
  for (const GgufTensor& t : f.tensors()) {
    SCOPED_TRACE(t.name);
    const TensorView& w = want.at(t.name);
    ASSERT_EQ(t.shape(), w.shape);
    const std::vector<float> got = f.dequantize(t);
    expect_same_floats(got.data(), as_floats(w), got.size(), t.name);
  }
}

TEST(GgufDequant, UnsupportedTypesThrow) {
  uint8_t block[66] = {0};
  float out[256];
  EXPECT_NE(error_of([&] { dequantize_row(GgmlType::IQ2_XXS, block, out, 256); }).find("IQ2_XXS is not supported"),
            std::string::npos);
  EXPECT_NE(error_of([&] { dequantize_row(GgmlType::Q8_0, block, out, 33); }).find("not a multiple"),
            std::string::npos);
  EXPECT_EQ(ggml_type_info(4), nullptr);  // a removed type id
  EXPECT_STREQ(ggml_type_info(12)->name, "Q4_K");
  EXPECT_EQ(ggml_type_info(12)->type_size, 144u);
}

// ------------------------------------------------------------------------------------------------
// convert
// ------------------------------------------------------------------------------------------------

// llama.cpp's permutation on a head of 4 rows puts HF rows (0, 2) and (1, 3) -- the two halves of each
// rotary pair -- next to each other: GGUF order [0, 2, 1, 3]. Two heads, two columns.
TEST(GgufConvert, UnpermuteUndoesLlamaCppRowOrder) {
  const float gguf_rows[] = {0, 0.5, 2, 2.5, 1, 1.5, 3, 3.5, 4, 4.5, 6, 6.5, 5, 5.5, 7, 7.5};
  float hf[16];
  unpermute_qk_rows(gguf_rows, hf, 8, 2, 2);
  for (int r = 0; r < 8; ++r) {
    EXPECT_EQ(hf[2 * r], float(r));
    EXPECT_EQ(hf[2 * r + 1], float(r) + 0.5f);
  }
  EXPECT_THROW(unpermute_qk_rows(gguf_rows, hf, 6, 2, 2), Error);
}

TEST(GgufConvert, TensorNames) {
  EXPECT_EQ(hf_tensor_name("token_embd.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(hf_tensor_name("blk.12.ffn_down.weight"), "model.layers.12.mlp.down_proj.weight");
  EXPECT_EQ(hf_tensor_name("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(hf_tensor_name("blk.3.attn_k_norm.weight"), "model.layers.3.self_attn.k_norm.weight");
  EXPECT_EQ(hf_tensor_name("rope_freqs.weight"), "");
  EXPECT_THROW(hf_tensor_name("blk.x.ffn_down.weight"), Error);
  EXPECT_THROW(hf_tensor_name("blk.0.ffn_gate_exps.weight"), Error);
}

// Every tensor of the converted directory equals `want` (bitwise), and the names match exactly.
void expect_checkpoint_equals(const std::string& dir, const SafetensorsFile& want) {
  Checkpoint ck(dir);
  std::vector<std::string> want_names;
  for (const TensorView& t : want.tensors()) want_names.push_back(t.name);
  std::sort(want_names.begin(), want_names.end());
  EXPECT_EQ(ck.names(), want_names);
  for (const TensorView& w : want.tensors()) {
    SCOPED_TRACE(w.name);
    const TensorView* got = ck.find(w.name);
    ASSERT_NE(got, nullptr);
    ASSERT_EQ(got->shape, w.shape);
    expect_same_floats(as_floats(*got), as_floats(w), size_t(w.numel()), w.name);
  }
}

TEST(GgufConvert, SmolLM2MatchesTransformersGgufImport) {
  const Scratch sc("smollm2");
  const std::string out = (sc.path / "SmolLM2-135M-Instruct").string();
  size_t calls = 0, total = 0;
  convert_gguf_to_hf(KVD_GGUF, out, [&](size_t done, size_t n, const std::string&) {
    EXPECT_EQ(done, ++calls);
    total = n;
  });
  EXPECT_EQ(calls, 272u);
  EXPECT_EQ(total, 272u);
  for (const char* name : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                           "generation_config.json"})
    EXPECT_TRUE(fs::exists(fs::path(out) / name)) << name;
  EXPECT_FALSE(fs::exists(out + ".tmp"));

  // Weights: transformers' state dict of the same GGUF (it un-permutes Q/K itself). lm_head is tied.
  expect_checkpoint_equals(out, SafetensorsFile(kGolden + "/hf_state_dict.safetensors"));

  // config.json through kvdistill's own parser.
  const ModelConfig c = load_config(out);
  EXPECT_EQ(c.family, Family::Llama);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 576);
  EXPECT_EQ(c.intermediate_size, 1536);
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.num_heads, 9);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 100000.0);
  EXPECT_EQ(c.rope_scaling, RopeScaling::None);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  ASSERT_TRUE(c.bos_token_id.has_value());
  EXPECT_EQ(*c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});

  // tokenizer.json / tokenizer_config.json structure.
  const json tok = load_json(out + "/tokenizer.json");
  EXPECT_EQ(tok["model"]["type"], "BPE");
  EXPECT_EQ(tok["model"]["vocab"].size(), 49152u);
  EXPECT_EQ(tok["model"]["vocab"]["<|im_end|>"], 2);
  EXPECT_EQ(tok["model"]["merges"].size(), 48900u);
  EXPECT_EQ(tok["model"]["ignore_merges"], false);
  EXPECT_EQ(tok["added_tokens"].size(), 17u);
  EXPECT_EQ(tok.value(json::json_pointer("/pre_tokenizer/pretokenizers/0/type"), ""), "Digits");
  EXPECT_EQ(tok.value(json::json_pointer("/pre_tokenizer/pretokenizers/1/type"), ""), "ByteLevel");
  EXPECT_TRUE(tok["normalizer"].is_null());
  const json tc = load_json(out + "/tokenizer_config.json");
  EXPECT_EQ(tc["bos_token"], "<|im_start|>");
  EXPECT_EQ(tc["eos_token"], "<|im_end|>");
  EXPECT_EQ(tc["pad_token"], "<|im_end|>");
  EXPECT_EQ(tc["unk_token"], "<|endoftext|>");
  EXPECT_EQ(tc["add_bos_token"], false);
  EXPECT_EQ(tc["model_max_length"], 8192);
  EXPECT_EQ(tc["chat_template"], GgufFile(KVD_GGUF).get_string("tokenizer.chat_template"));
  const json gc = load_json(out + "/generation_config.json");
  EXPECT_EQ(gc["bos_token_id"], 1);
  EXPECT_EQ(gc["eos_token_id"], 2);

  // transformers / tokenizers accept the directory, tokenizer ids agree (see the oracle's report).
  EXPECT_TRUE(python_check(out, "smollm2"));
}

TEST(GgufConvert, TinyLlamaUnpermutesAndKeepsLlama3RopeAndBos) {
  const Scratch sc("tiny_llama");
  const std::string out = (sc.path / "model").string();
  convert_gguf_to_hf(kGolden + "/tiny_llama.gguf", out);
  expect_checkpoint_equals(out, SafetensorsFile(kGolden + "/tiny_llama_expected.safetensors"));
  const json cfg = load_json(out + "/config.json");
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  EXPECT_EQ(cfg["rope_theta"], 500000.0);
  EXPECT_EQ(cfg["rms_norm_eps"], 1e-6);
  EXPECT_EQ(cfg["rope_scaling"], json({{"rope_type", "llama3"},
                                       {"factor", 8.0},
                                       {"low_freq_factor", 1.0},
                                       {"high_freq_factor", 4.0},
                                       {"original_max_position_embeddings", 8192}}));
  const ModelConfig c = load_config(out);
  EXPECT_EQ(c.rope_scaling, RopeScaling::Llama3);
  EXPECT_EQ(c.rope_factor, 8.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  const json tok = load_json(out + "/tokenizer.json");
  EXPECT_EQ(tok["model"]["ignore_merges"], true);
  EXPECT_EQ(tok.value(json::json_pointer("/pre_tokenizer/pretokenizers/0/type"), ""), "Split");
  EXPECT_EQ(tok.value(json::json_pointer("/post_processor/processors/1/type"), ""), "TemplateProcessing");
  EXPECT_EQ(tok["added_tokens"].size(), 3u);
  EXPECT_EQ(tok["added_tokens"][2]["content"], "<tool>");
  EXPECT_EQ(tok["added_tokens"][2]["special"], false);
  EXPECT_TRUE(python_check(out, "tiny_llama"));
}

TEST(GgufConvert, TinyQwen2KeepsBiasesAndRowOrder) {
  const Scratch sc("tiny_qwen2");
  const std::string out = (sc.path / "model").string();
  convert_gguf_to_hf(kGolden + "/tiny_qwen2.gguf", out);
  expect_checkpoint_equals(out, SafetensorsFile(kGolden + "/tiny_qwen2_expected.safetensors"));
  const ModelConfig c = load_config(out);
  EXPECT_EQ(c.family, Family::Qwen2);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  const json tok = load_json(out + "/tokenizer.json");
  EXPECT_EQ(tok["normalizer"]["type"], "NFC");
  EXPECT_TRUE(python_check(out, "tiny_qwen2"));
}

TEST(GgufConvert, TinyQwen3KeepsQkNormsAndHeadDim) {
  const Scratch sc("tiny_qwen3");
  const std::string out = (sc.path / "model").string();
  convert_gguf_to_hf(kGolden + "/tiny_qwen3.gguf", out);
  expect_checkpoint_equals(out, SafetensorsFile(kGolden + "/tiny_qwen3_expected.safetensors"));
  const ModelConfig c = load_config(out);
  EXPECT_EQ(c.family, Family::Qwen3);
  EXPECT_EQ(c.head_dim, 16);  // not hidden_size / num_heads = 8
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_TRUE(python_check(out, "tiny_qwen3"));
}

TEST(GgufConvert, ShardsWithAnIndex) {
  const Scratch sc("shards");
  const std::string out = (sc.path / "model").string();
  convert_gguf_to_hf(kGolden + "/tiny_llama.gguf", out, {}, 40000);
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  const json index = load_json(out + "/model.safetensors.index.json");
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GT(files.size(), 2u);
  for (const std::string& file : files) EXPECT_TRUE(fs::exists(fs::path(out) / file)) << file;
  expect_checkpoint_equals(out, SafetensorsFile(kGolden + "/tiny_llama_expected.safetensors"));
}

TEST(GgufConvert, UnsupportedInputsFailAndLeaveNothing) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"tiny_bad_arch.gguf", {"general.architecture 'phi3' is not supported"}},
      {"tiny_bad_spm.gguf", {"tokenizer.ggml.model 'llama' (SentencePiece) is not supported"}},
      {"tiny_bad_pre.gguf", {"tokenizer.ggml.pre 'deepseek-llm' is not supported"}},
      {"tiny_bad_type.gguf", {"tensor 'blk.1.ffn_down.weight' has type Q8_1"}},
      {"corrupt/truncated_data.gguf", {"extends past the end of the file"}},
      {"corrupt/version2.gguf", {"GGUF version 2 is not supported"}},
  };
  const Scratch sc("bad");
  for (const auto& [file, reasons] : cases) {
    SCOPED_TRACE(file);
    const std::string path = kGolden + "/" + file;
    const std::string out = (sc.path / "out").string();
    const std::string msg = error_of([&] { convert_gguf_to_hf(path, out); });
    EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << msg;
    for (const std::string& r : reasons) EXPECT_NE(msg.find(r), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(out));
    EXPECT_FALSE(fs::exists(out + ".tmp"));
  }
}

TEST(GgufConvert, ReplacesItsOwnOutputOnly) {
  const Scratch sc("replace");
  const std::string out = (sc.path / "model").string();
  const std::string gguf = kGolden + "/tiny_qwen2.gguf";
  convert_gguf_to_hf(gguf, out + "/");  // a trailing slash is fine
  write_bytes(fs::path(out) / ".converted", "");
  convert_gguf_to_hf(gguf, out);  // replaces a previous conversion
  EXPECT_TRUE(fs::exists(out + "/config.json"));
  EXPECT_FALSE(fs::exists(out + ".old"));
  write_bytes(fs::path(out) / "notes.txt", "mine");
  const std::string msg = error_of([&] { convert_gguf_to_hf(gguf, out); });
  EXPECT_NE(msg.find("holds 'notes.txt'"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(out + "/notes.txt"));
  EXPECT_TRUE(fs::exists(out + "/config.json"));
}

}  // namespace
}  // namespace kvd
