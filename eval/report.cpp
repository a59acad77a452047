#include "eval/run_parts.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "models/device.h"
#include "eval/tasks_io.h"
#include "export/gate_bundle.h"
#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/heuristics.h"
#include "models/chat_template.h"
#include "models/config.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
namespace kvd {

using nlohmann::json;
using namespace evalrun;

// --- reports ----------------------------------------------------------------------------------------------

static void write_eval_reports_impl(const std::string& out_dir);

void write_eval_reports(const std::string& out_dir) {
  // A record or run.json edited by hand (a field of another type) is an error naming the directory.
  with_json_context(out_dir + "/results.jsonl", "unexpected record", [&] { write_eval_reports_impl(out_dir); });
}

static void write_eval_reports_impl(const std::string& out_dir) {
  const std::vector<json> rows = read_results(out_dir + "/results.jsonl");
  KVD_CHECK(!rows.empty(), out_dir, "/results.jsonl: no results yet");
  json settings = json::object();
  if (std::filesystem::exists(out_dir + "/run.json")) settings = parse_json(read_file(out_dir + "/run.json"), out_dir + "/run.json", "not valid JSON");

  struct Acc {
    int64_t n = 0;
    double score = 0, kl = 0, log_ppl = 0, hit = 0, kept = 0, peak = 0, prefill = 0, decode = 0;
    void add(const json& r) {
      ++n;
      score += r.at("score").get<double>();
      kl += r.at("kl").get<double>();
      log_ppl += std::log(std::max(1e-30, r.at("ppl").get<double>()));
      hit += r.at("hit_rate").get<double>();
      kept += r.at("kept_fraction").get<double>();
      peak += static_cast<double>(r.at("peak_kv_bytes").get<int64_t>());
      prefill += r.at("prefill_s").get<double>();
      decode += r.at("decode_s").get<double>();
    }
    json to_json() const {
      const double d = static_cast<double>(std::max<int64_t>(1, n));
      return {{"n", n},           {"accuracy", 100.0 * score / d}, {"kl", kl / d},
              {"ppl", std::exp(log_ppl / d)}, {"hit_rate", hit / d}, {"kept_fraction", kept / d},
              {"peak_kv_bytes", peak / d}, {"prefill_s", prefill / d}, {"decode_s", decode / d}};
    }
  };
  // (method, budget) in first-seen order; per task and length bucket inside.
  std::vector<std::pair<std::string, std::string>> cfgs;
  std::map<std::pair<std::string, std::string>, std::string> labels;
  std::map<std::pair<std::string, std::string>, std::map<std::pair<std::string, int64_t>, Acc>> per;
  std::set<std::pair<std::string, int64_t>> cells;
  for (const json& r : rows) {
    const auto k = std::make_pair(r.at("method").get<std::string>(), r.at("budget").get<std::string>());
    if (!per.count(k)) cfgs.push_back(k);
    labels[k] = r.value("label", k.first);
    const auto cell = std::make_pair(r.at("task").get<std::string>(), length_bucket(r.at("length").get<int64_t>()));
    per[k][cell].add(r);
    cells.insert(cell);
  }
  // Overall numbers weight every (task, length) cell equally.
  auto overall = [&](const std::map<std::pair<std::string, int64_t>, Acc>& m) {
    json o = json::object();
    const char* keys[] = {"accuracy", "kl", "hit_rate", "kept_fraction", "peak_kv_bytes", "prefill_s", "decode_s"};
    double log_ppl = 0;
    int64_t n = 0;
    for (const char* key : keys) o[key] = 0.0;
    for (const auto& [cell, acc] : m) {
      const json a = acc.to_json();
      for (const char* key : keys) o[key] = o[key].get<double>() + a[key].get<double>() / static_cast<double>(m.size());
      log_ppl += std::log(a["ppl"].get<double>()) / static_cast<double>(m.size());
      n += acc.n;
    }
    o["ppl"] = std::exp(log_ppl);
    o["n"] = n;
    return o;
  };
  json out = {{"settings", settings}, {"configs", json::array()}};
  std::ostringstream csv;
  csv << "method,label,budget,task,length,n,accuracy,kl,ppl,hit_rate,kept_fraction,peak_kv_bytes,prefill_s,decode_s\n";
  for (const auto& k : cfgs) {
    json c = {{"method", k.first}, {"label", labels[k]}, {"budget", k.second}, {"overall", overall(per[k])},
              {"per_task", json::array()}};
    for (const auto& [cell, acc] : per[k]) {
      json a = acc.to_json();
      a["task"] = cell.first;
      a["length"] = cell.second;
      c["per_task"].push_back(a);
      csv << k.first << "," << labels[k] << "," << k.second << "," << cell.first << "," << cell.second << "," << acc.n
          << "," << fmt(a["accuracy"].get<double>(), 2) << "," << fmt(a["kl"].get<double>(), 5) << ","
          << fmt(a["ppl"].get<double>(), 4) << "," << fmt(a["hit_rate"].get<double>(), 4) << ","
          << fmt(a["kept_fraction"].get<double>(), 4) << "," << fmt(a["peak_kv_bytes"].get<double>(), 0) << ","
          << fmt(a["prefill_s"].get<double>(), 4) << "," << fmt(a["decode_s"].get<double>(), 4) << "\n";
    }
    out["configs"].push_back(c);
  }
  write_file_atomic(out_dir + "/results.json", out.dump(2) + "\n");
  write_file_atomic(out_dir + "/results.csv", csv.str());

  // Markdown: one table per metric (methods x budgets), then accuracy per task for each budget.
  std::vector<std::string> budgets, methods;
  for (const auto& k : cfgs) {
    if (k.first != "full" && std::find(budgets.begin(), budgets.end(), k.second) == budgets.end()) budgets.push_back(k.second);
    if (std::find(methods.begin(), methods.end(), k.first) == methods.end()) methods.push_back(k.first);
  }
  auto label_of = [&](const std::string& m) {
    for (const auto& [k, v] : labels)
      if (k.first == m) return v;
    return m;
  };
  auto find = [&](const std::string& m, const std::string& b) -> const json* {
    for (const json& c : out["configs"])
      if (c["method"] == m && c["budget"] == b) return &c;
    return nullptr;
  };
  std::ostringstream md;
  md << "# kvdistill eval\n\n";
  if (!settings.empty())
    md << "Model " << settings.value("model", std::string()) << ", tasks `" << settings.value("tasks", std::string())
       << "`, query-" << settings.value("query", std::string()) << ". Accuracy: RULER string match, every (task, "
       << "length) cell weighted equally. KL(full || method) over the teacher-forced question and full-cache "
       << "answer; hit rate: kept context entries among the top-k by the full answer's attention.\n\n";
  struct Metric {
    const char* key;
    const char* title;
    int prec;
    double scale;
  };
  const Metric metrics[] = {{"accuracy", "Accuracy (%)", 1, 1.0},
                            {"kl", "KL(full || method), nats per token", 4, 1.0},
                            {"hit_rate", "Critical-KV hit rate", 3, 1.0},
                            {"kept_fraction", "Kept fraction of the KV entries", 3, 1.0},
                            {"peak_kv_bytes", "Peak KV MiB per sample", 2, 1.0 / (1024.0 * 1024.0)}};
  const json* full = find("full", "none");
  for (const Metric& mt : metrics) {
    md << "## " << mt.title << "\n\n| method |";
    for (const std::string& b : budgets) md << " " << b << " |";
    md << "\n|---|";
    for (size_t i = 0; i < budgets.size(); ++i) md << "---:|";
    md << "\n";
    if (full) {
      md << "| full cache |";
      for (size_t i = 0; i < budgets.size(); ++i)
        md << " " << fmt((*full)["overall"][mt.key].get<double>() * mt.scale, mt.prec) << " |";
      md << "\n";
    }
    for (const std::string& m : methods) {
      if (m == "full") continue;
      md << "| " << label_of(m) << " |";
      for (const std::string& b : budgets) {
        const json* c = find(m, b);
        md << " " << (c ? fmt((*c)["overall"][mt.key].get<double>() * mt.scale, mt.prec) : std::string("-")) << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  // Per task: one table per budget (and the full cache's).
  std::vector<std::pair<std::string, int64_t>> cell_list(cells.begin(), cells.end());
  auto per_task_table = [&](const std::string& title, const std::vector<std::pair<std::string, std::string>>& rows_) {
    md << "## " << title << "\n\n| method |";
    for (const auto& c : cell_list) md << " " << c.first << " " << bucket_label(c.second) << " |";
    md << "\n|---|";
    for (size_t i = 0; i < cell_list.size(); ++i) md << "---:|";
    md << "\n";
    for (const auto& [m, b] : rows_) {
      md << "| " << (m == "full" ? std::string("full cache") : label_of(m)) << " |";
      for (const auto& cell : cell_list) {
        auto it = per[{m, b}].find(cell);
        md << " " << (it == per[{m, b}].end() ? std::string("-") : fmt(it->second.to_json()["accuracy"].get<double>(), 1)) << " |";
      }
      md << "\n";
    }
    md << "\n";
  };
  for (const std::string& b : budgets) {
    std::vector<std::pair<std::string, std::string>> rs;
    if (full) rs.push_back({"full", "none"});
    for (const std::string& m : methods)
      if (m != "full" && per.count({m, b})) rs.push_back({m, b});
    per_task_table("Accuracy (%) per task, " + b, rs);
  }
  if (budgets.empty() && full) per_task_table("Accuracy (%) per task, full cache", {{"full", "none"}});
  write_file_atomic(out_dir + "/results.md", md.str());
}

}  // namespace kvd
