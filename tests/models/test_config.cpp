// HF config.json parsing against what transformers resolves from the same files
// (tests/oracles/config_golden.py).
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "models/config.h"
#include "test_paths.h"

namespace kvd {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kGolden = std::string(KVD_TESTDATA) + "/config_golden";

json load_json(const std::string& path) { return json::parse(read_file(path)); }

const char* rope_name(RopeScaling r) {
  switch (r) {
    case RopeScaling::None: return "none";
    case RopeScaling::Linear: return "linear";
    case RopeScaling::Llama3: return "llama3";
  }
  return "?";
}

// The struct's fields against the oracle's values (names as in expected.json).
void expect_config(const ModelConfig& c, const json& e) {
  const std::map<std::string, Family> families = {
      {"llama", Family::Llama}, {"mistral", Family::Mistral}, {"qwen2", Family::Qwen2}, {"qwen3", Family::Qwen3}};
  EXPECT_EQ(c.family, families.at(e["family"].get<std::string>()));
  EXPECT_EQ(family_name(c.family), e["family"].get<std::string>());
  EXPECT_EQ(c.architecture, e["architecture"].get<std::string>());
  EXPECT_EQ(c.model_type, e["model_type"].get<std::string>());
  EXPECT_EQ(c.hidden_size, e["hidden_size"].get<int64_t>());
  EXPECT_EQ(c.intermediate_size, e["intermediate_size"].get<int64_t>());
  EXPECT_EQ(c.num_layers, e["num_layers"].get<int64_t>());
  EXPECT_EQ(c.num_heads, e["num_heads"].get<int64_t>());
  EXPECT_EQ(c.num_kv_heads, e["num_kv_heads"].get<int64_t>());
  EXPECT_EQ(c.group_size(), e["num_heads"].get<int64_t>() / e["num_kv_heads"].get<int64_t>());
  EXPECT_EQ(c.head_dim, e["head_dim"].get<int64_t>());
  EXPECT_EQ(c.vocab_size, e["vocab_size"].get<int64_t>());
  EXPECT_EQ(c.max_position_embeddings, e["max_position_embeddings"].get<int64_t>());
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, e["rms_norm_eps"].get<double>());
  EXPECT_DOUBLE_EQ(c.rope_theta, e["rope_theta"].get<double>());
  EXPECT_STREQ(rope_name(c.rope_scaling), e["rope_scaling"].get<std::string>().c_str());
  if (e.contains("rope_factor")) EXPECT_DOUBLE_EQ(c.rope_factor, e["rope_factor"].get<double>());
  if (e.contains("rope_low_freq_factor")) {
    EXPECT_DOUBLE_EQ(c.rope_low_freq_factor, e["rope_low_freq_factor"].get<double>());
    EXPECT_DOUBLE_EQ(c.rope_high_freq_factor, e["rope_high_freq_factor"].get<double>());
    EXPECT_EQ(c.rope_original_max_position, e["rope_original_max_position"].get<int64_t>());
  }
  EXPECT_EQ(c.activation, Activation::SiLU);
  EXPECT_EQ(c.tie_word_embeddings, e["tie_word_embeddings"].get<bool>());
  EXPECT_EQ(c.attention_bias, e["attention_bias"].get<bool>());
  EXPECT_EQ(c.o_proj_bias, e["o_proj_bias"].get<bool>());
  EXPECT_EQ(c.qk_norm, e["qk_norm"].get<bool>());
  if (e["sliding_window"].is_null()) {
    EXPECT_FALSE(c.sliding_window.has_value());
  } else {
    ASSERT_TRUE(c.sliding_window.has_value());
    EXPECT_EQ(*c.sliding_window, e["sliding_window"].get<int64_t>());
  }
  if (e["bos_token_id"].is_null()) {
    EXPECT_FALSE(c.bos_token_id.has_value());
  } else {
    ASSERT_TRUE(c.bos_token_id.has_value());
    EXPECT_EQ(*c.bos_token_id, e["bos_token_id"].get<int64_t>());
  }
  EXPECT_EQ(c.eos_token_ids, e["eos_token_ids"].get<std::vector<int64_t>>());
}

TEST(Config, MatchesTransformersForEveryFamily) {
  const json expected = load_json(kGolden + "/expected.json");
  ASSERT_GE(expected.size(), 15u);
  std::set<std::string> families;
  for (const auto& [name, e] : expected.items()) {
    SCOPED_TRACE(name);
    const ModelConfig c = load_config(kGolden + "/valid/" + name);  // a directory
    expect_config(c, e);
    families.insert(family_name(c.family));
  }
  EXPECT_EQ(families.size(), 4u);
}

// to_json() is the resolved config: every key the oracle names, with the same value.
TEST(Config, ToJsonHasResolvedValues) {
  const json expected = load_json(kGolden + "/expected.json");
  for (const auto& [name, e] : expected.items()) {
    SCOPED_TRACE(name);
    const json got = load_config(kGolden + "/valid/" + name + "/config.json").to_json();  // a file path
    for (const auto& [key, value] : e.items()) {
      ASSERT_TRUE(got.contains(key)) << key;
      if (value.is_number_float()) {
        EXPECT_DOUBLE_EQ(got[key].get<double>(), value.get<double>()) << key;
      } else {
        EXPECT_EQ(got[key], value) << key;
      }
    }
    for (const char* key : {"num_heads", "num_kv_heads", "group_size", "head_dim", "rope_factor", "activation",
                            "rope_original_max_position", "sliding_window", "bos_token_id", "eos_token_ids"}) {
      EXPECT_TRUE(got.contains(key)) << key;
    }
  }
}

TEST(Config, InvalidVariantsNamePathAndField) {
  const json invalid = load_json(kGolden + "/invalid.json");
  ASSERT_GE(invalid.size(), 25u);
  for (const auto& [name, needles] : invalid.items()) {
    SCOPED_TRACE(name);
    const std::string path = kGolden + "/invalid/" + name + "/config.json";
    try {
      load_config(kGolden + "/invalid/" + name);
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << msg;
      for (const json& n : needles) EXPECT_NE(msg.find(n.get<std::string>()), std::string::npos) << n << " in " << msg;
    }
  }
}

TEST(Config, ParseConfigUsesContextAndFieldForm) {
  json j = load_json(kGolden + "/valid/qwen2/config.json");
  EXPECT_NO_THROW(parse_config(j, "ctx"));
  j.erase("num_attention_heads");
  try {
    parse_config(j, "my/config.json");
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "my/config.json: field 'num_attention_heads': missing");
  }
}

TEST(Config, UnknownKeysAreFine) {
  json j = load_json(kGolden + "/valid/llama3_rope/config.json");
  j["some_future_field"] = {{"a", 1}};
  j["torch_dtype"] = "bfloat16";
  j["attn_logit_softcapping"] = nullptr;
  EXPECT_NO_THROW(parse_config(j, "ctx"));
}

TEST(Config, MissingPaths) {
  const std::string nope = kGolden + "/no_such_model";
  try {
    load_config(nope);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(nope), std::string::npos) << e.what();
  }
  const fs::path empty = fs::path(KVD_TESTDATA) / "scratch" / ("test_config." + std::to_string(::getpid()));
  fs::create_directories(empty);
  try {
    load_config(empty.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find((empty / "config.json").string()), std::string::npos) << e.what();
  }
  fs::remove_all(empty);
}

}  // namespace
}  // namespace kvd
