#include "eval/tasks_io.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_error.h"

namespace kvd {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

}  // namespace

std::vector<EvalSample> read_eval_tasks(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  KVD_CHECK(in.good(), "--tasks ", path, ": cannot be read (make one with `kvdistill prepare tasks`)");
  std::vector<EvalSample> out;
  std::set<std::string> ids;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = parse_json(line, path + ":" + std::to_string(n), "not valid JSON");
    KVD_CHECK(j.is_object(), path, ":", n, ": each line must be a JSON object");
    auto need = [&](const char* key) -> const nlohmann::json& {
      KVD_CHECK(j.contains(key), path, ":", n, ": missing field \"", key,
                "\" (each line needs id, context, question, answers, task, length)");
      return j[key];
    };
    EvalSample s;
    s.line = n;
    const nlohmann::json& id = need("id");
    KVD_CHECK(id.is_string() || id.is_number_integer(), path, ":", n, ": \"id\" must be a string or an integer");
    s.id = id.is_string() ? id.get<std::string>() : std::to_string(id.get<int64_t>());
    auto str = [&](const char* key) {
      const nlohmann::json& v = need(key);
      KVD_CHECK(v.is_string(), path, ":", n, ": \"", key, "\" must be a string");
      return v.get<std::string>();
    };
    s.context = str("context");
    s.question = str("question");
    s.task = str("task");
    const nlohmann::json& answers = need("answers");
    KVD_CHECK(answers.is_array() && !answers.empty(), path, ":", n, ": \"answers\" must be a non-empty list of strings");
    for (const auto& a : answers) {
      KVD_CHECK(a.is_string(), path, ":", n, ": \"answers\" must be a list of strings");
      s.answers.push_back(a.get<std::string>());
    }
    const nlohmann::json& len = need("length");
    KVD_CHECK(len.is_number_integer(), path, ":", n, ": \"length\" must be an integer");
    s.length = len.get<int64_t>();
    if (j.contains("answer_prefix")) {
      KVD_CHECK(j["answer_prefix"].is_string(), path, ":", n, ": \"answer_prefix\" must be a string");
      s.answer_prefix = j["answer_prefix"].get<std::string>();
    }
    if (j.contains("max_new_tokens")) {
      KVD_CHECK(j["max_new_tokens"].is_number_integer() && j["max_new_tokens"].get<int64_t>() > 0, path, ":", n,
                ": \"max_new_tokens\" must be a positive integer");
      s.max_new_tokens = j["max_new_tokens"].get<int64_t>();
    }
    KVD_CHECK(!s.context.empty(), path, ":", n, ": empty \"context\"");
    KVD_CHECK(ids.insert(s.id).second, path, ":", n, ": duplicate id \"", s.id, "\"");
    out.push_back(std::move(s));
  }
  KVD_CHECK(!out.empty(), "--tasks ", path, ": no samples");
  return out;
}

MatchRule match_rule_for(const std::string& task) {
  return task.rfind("qa", 0) == 0 ? MatchRule::Part : MatchRule::All;
}

double string_match(const std::string& output, const std::vector<std::string>& answers, MatchRule rule) {
  if (answers.empty()) return 0.0;
  const std::string o = lower(output);
  int64_t hits = 0;
  for (const std::string& a : answers) hits += o.find(lower(a)) != std::string::npos ? 1 : 0;
  if (rule == MatchRule::Part) return hits > 0 ? 1.0 : 0.0;
  return static_cast<double>(hits) / static_cast<double>(answers.size());
}

}  // namespace kvd
