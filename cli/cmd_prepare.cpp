// kvdistill prepare <what>: datasets derived from a model and a corpus (library code in data/).
//   prepare text     text / Markdown / reST / JSONL -> packed token sequences (HDF5, data/packed_text.h)
//   prepare inspect  checks a dataset file (every attribute, the CSR structure, optionally the
//                    tokenizer against a model) and prints a JSON summary
//   prepare tasks    a RULER-style synthetic long-context task suite (JSONL, data/tasks.h)
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <iostream>
#include <map>

#include "cli/commands.h"
#include "common/error.h"
#include "data/packed_text.h"
#include "data/prepare_text.h"
#include "data/tasks.h"
#include "models/tokenizer.h"

namespace kvd::cli {
namespace {

using json = nlohmann::ordered_json;

struct TextArgs {
  PrepareTextOptions opt;
  std::string invalid_utf8 = "fail";
  std::string progress = "auto";
};

struct InspectArgs {
  std::string data, model;
};

int run_text(const TextArgs& a) {
  PrepareTextOptions opt = a.opt;
  opt.invalid_utf8 = a.invalid_utf8 == "replace" ? InvalidUtf8::Replace : InvalidUtf8::Fail;
  opt.progress = a.progress == "never" ? Progress::Never : a.progress == "lines" ? Progress::Lines : Progress::Auto;
  const PrepareTextStats s = prepare_text(opt);
  const int tr = static_cast<int>(Split::Train), va = static_cast<int>(Split::Val);
  std::cout << "prepare text: " << opt.out << ": " << s.documents << " documents, " << s.bytes / 1e6 << " MB in "
            << s.seconds << " s; train " << s.sequences[tr] << " sequences (" << s.tokens[tr] << " tokens, "
            << s.split_documents[tr] << " docs), val " << s.sequences[va] << " sequences (" << s.tokens[va]
            << " tokens, " << s.split_documents[va] << " docs)\n";
  return 0;
}

int run_inspect(const InspectArgs& a) {
  const PackedTextReader r =
      a.model.empty() ? PackedTextReader::open(a.data) : PackedTextReader::open(a.data, Tokenizer::from_file(a.model));
  const PackedTextInfo& i = r.info();
  json j = {{"file", a.data},
            {"kvdistill_format", i.stamp.format},
            {"format_version", i.stamp.version},
            {"tokenizer_sha256", i.stamp.tokenizer_sha256},
            {"model_id", i.stamp.model_id},
            {"tokenizer_checked", !a.model.empty()},
            {"seq_len", i.seq_len},
            {"separator_id", i.separator_id},
            {"seed", i.seed},
            {"val_fraction", i.val_fraction},
            {"num_documents", i.num_documents},
            {"source_bytes", i.source_bytes}};
  for (Split s : {Split::Train, Split::Val}) {
    const PackedSplitReader sr = r.split(s);
    j[split_name(s)] = {{"num_sequences", sr.size()}, {"num_tokens", sr.num_tokens()}};
  }
  std::cout << j.dump(2) << "\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  CLI::App* prep = root.add_subcommand("prepare", "Make datasets from a model and a corpus (text, inspect, tasks)");
  prep->require_subcommand(1);
  auto runs = std::make_shared<std::map<CLI::App*, std::function<int()>>>();

  // prepare text
  auto t = std::make_shared<TextArgs>();
  CLI::App* text = prep->add_subcommand("text", "Tokenize and pack text into fixed-length sequences (HDF5)");
  text->add_option("--model", t->opt.model_dir, "Model directory (its tokenizer.json and chat template are used)")->required();
  text->add_option("--input", t->opt.inputs, "Text, .md, .rst or .jsonl files, or directories (walked recursively)")
      ->required()
      ->expected(1, -1);
  text->add_option("--out", t->opt.out, "Output .h5 file (written to a temporary name, renamed when complete)")->required();
  text->add_option("--seq-len", t->opt.seq_len, "Tokens per packed sequence")->capture_default_str();
  text->add_option("--val-fraction", t->opt.val_fraction, "Fraction of documents held out for validation")
      ->capture_default_str();
  text->add_option("--seed", t->opt.seed, "Seed of the document-level train/val split")->capture_default_str();
  text->add_option("--threads", t->opt.threads, "Tokenizer threads (0: one per core, at most 8)")->capture_default_str();
  text->add_option("--separator", t->opt.separator, "Token appended to each document: auto (end-of-text), none, or a token")
      ->capture_default_str();
  text->add_option("--max-doc-bytes", t->opt.max_doc_bytes, "Text files larger than this are cut into several documents")
      ->capture_default_str();
  text->add_option("--invalid-utf8", t->invalid_utf8, "fail, or replace invalid bytes with U+FFFD")
      ->check(CLI::IsMember({"fail", "replace"}))
      ->capture_default_str();
  text->add_option("--progress", t->progress, "auto (live on a terminal), lines, never")
      ->check(CLI::IsMember({"auto", "lines", "never"}))
      ->capture_default_str();
  (*runs)[text] = [t] { return run_text(*t); };

  // prepare inspect
  auto in = std::make_shared<InspectArgs>();
  CLI::App* inspect = prep->add_subcommand("inspect", "Check a packed_text .h5 file and print a JSON summary");
  inspect->add_option("data", in->data, "The .h5 file")->required();
  inspect->add_option("--model", in->model, "Also check that the file was tokenized with this model's tokenizer");
  (*runs)[inspect] = [in] { return run_inspect(*in); };

  // prepare tasks
  auto ta = std::make_shared<TaskSuiteOptions>();
  auto lengths = std::make_shared<std::string>("1024,2048,4096");
  CLI::App* tasks = prep->add_subcommand("tasks", "Generate a RULER-style synthetic long-context task suite (JSONL)");
  tasks->add_option("--model", ta->model_dir, "Model directory (lengths are measured with its tokenizer)")->required();
  tasks->add_option("--suite", ta->suite, "Task suite")->check(CLI::IsMember({"ruler"}))->capture_default_str();
  tasks->add_option("--lengths", *lengths, "Comma-separated context lengths in model tokens")->capture_default_str();
  tasks->add_option("--samples", ta->samples, "Samples per (task, length)")->capture_default_str();
  tasks->add_option("--seed", ta->seed, "Seed (the same seed gives a byte-identical file)")->capture_default_str();
  tasks->add_option("--corpus", ta->corpus, "Haystack text: files or directories (default .cache/corpus)")
      ->expected(1, -1);
  tasks->add_option("--tasks", ta->tasks, "Subset of tasks (default: all)")->expected(1, -1);
  tasks->add_option("--out", ta->out, "Output .jsonl file")->required();
  (*runs)[tasks] = [ta, lengths] {
    ta->lengths = parse_lengths(*lengths);
    const TaskSuiteStats s = write_task_suite(*ta);
    std::cout << "prepare tasks: " << ta->out << ": " << s.samples << " samples in " << s.seconds
              << " s; worst length error " << 100.0 * s.max_rel_error << "%\n";
    return 0;
  };

  on_run(prep, [prep, runs] {
    for (CLI::App* sub : prep->get_subcommands()) {
      auto it = runs->find(sub);
      if (it != runs->end()) return it->second();
    }
    return 2;
  });
});

}  // namespace
}  // namespace kvd::cli
