// kvdistill prepare <what>: datasets derived from a model and a corpus (library code in data/).
//   prepare text     text / Markdown / reST / JSONL -> packed token sequences (HDF5, data/packed_text.h)
//   prepare inspect  checks a dataset file (every attribute, the CSR structure, optionally the
//                    tokenizer against a model) and prints a JSON summary
//   prepare tasks    a RULER-style synthetic long-context task suite (JSONL, data/tasks.h)
//   prepare prompts  a deterministic prompt set cut from a corpus (JSONL, data/prompts.h)
//   prepare responses  the frozen model's own greedy responses to a prompt set (HDF5, data/responses.h);
//                    resumable: an interrupted run continues from "<out>.partial"
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "common/fs.h"
#include "data/packed_text.h"
#include "data/prepare_text.h"
#include "data/prompts.h"
#include "data/responses.h"
#include "data/tasks.h"
#include "models/chat_template.h"
#include "models/generate.h"
#include "models/model.h"
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

struct ResponsesArgs {
  std::string model, prompts, out, device = "auto", progress = "auto";
  int64_t max_new_tokens = 256;
  int64_t batch = 8;
  bool overwrite = false;
};

namespace fs = std::filesystem;

std::string model_id_of(const std::string& model_dir) {
  std::error_code ec;
  fs::path p = fs::canonical(model_dir, ec);
  if (ec) p = fs::path(model_dir);
  return p.filename().string();
}

std::string fmt_duration(double s) {
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

int run_responses(const ResponsesArgs& a) {
  KVD_CHECK(a.max_new_tokens > 0, "--max-new-tokens ", a.max_new_tokens, ": must be positive");
  KVD_CHECK(a.batch > 0, "--batch ", a.batch, ": must be positive");
  make_parent_dirs(a.out);
  std::error_code ec;
  const std::vector<PromptRecord> records = read_prompts(a.prompts);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  ChatTemplate chat = [&] {
    try {
      return ChatTemplate::from_file(a.model);
    } catch (const Error& e) {
      KVD_FAIL("prepare responses renders prompts with the model's chat template: ", e.what());
    }
  }();
  std::vector<std::vector<int32_t>> prompts;
  for (const PromptRecord& r : records) {
    std::string text;
    try {
      text = chat.render(r.messages, AddGenerationPrompt::Yes);
    } catch (const Error& e) {
      KVD_FAIL(a.prompts, ":", r.line, ": ", e.what());
    }
    prompts.push_back(tok.encode(text));
    KVD_CHECK(!prompts.back().empty(), a.prompts, ":", r.line, ": the prompt encodes to no tokens");
  }

  const h5::Stamp stamp{kResponsesFormat, kResponsesVersion, tok.sha256(), model_id_of(a.model)};
  ResponsesSettings settings;
  settings.max_new_tokens = a.max_new_tokens;
  settings.batch = a.batch;
  settings.sampling = "greedy";
  settings.prompts_sha256 = sha256_hex(read_file(a.prompts));
  settings.chat_template = chat.format() == ChatFormat::ChatML ? "chatml" : "llama3";
  settings.num_prompts = static_cast<int64_t>(records.size());

  if (!a.overwrite && fs::exists(a.out, ec)) {  // a finished file: nothing to do if it was made the same way
    ResponsesInfo have;
    try {
      have = ResponsesReader::open(a.out, tok).info();
    } catch (const Error& e) {
      KVD_FAIL(a.out, " exists and is not a finished responses file of this model (", e.what(),
               "); use a new --out or pass --overwrite");
    }
    check_same_settings(a.out, have, stamp, settings);
    std::cout << "prepare responses: " << a.out << " is already complete (" << have.num_done << " responses)\n";
    return 0;
  }

  const std::string partial = a.out + ".partial";
  ResponsesWriter writer =
      ResponsesWriter::open(partial, stamp, settings, a.overwrite ? Existing::Overwrite : Existing::Resume);
  const int64_t n = settings.num_prompts, first = writer.num_done();
  if (first > 0 && a.progress != "never")
    std::cerr << "prepare responses: resuming " << partial << " after " << first << " of " << n << " prompts\n";

  const c10::Device device =
      parse_device(a.device);
  const Model model = Model::load(a.model, device);
  GenerateOptions opts;
  opts.mode = SamplingMode::Greedy;
  opts.max_new_tokens = a.max_new_tokens;
  std::vector<int64_t> eos = model.config().eos_token_ids;
  if (const auto eot = tok.token_id(chat.end_of_turn()))
    if (std::find(eos.begin(), eos.end(), *eot) == eos.end()) eos.push_back(*eot);
  opts.eos_ids = eos;

  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const bool live = a.progress == "auto" && tty, lines = a.progress == "lines" || (a.progress == "auto" && !tty);
  Stopwatch clock;
  int64_t new_tokens = 0;
  for (int64_t b0 = first; b0 < n; b0 += a.batch) {
    const int64_t b1 = std::min(n, b0 + a.batch);
    std::vector<std::vector<int64_t>> batch;
    for (int64_t i = b0; i < b1; ++i) batch.emplace_back(prompts[static_cast<size_t>(i)].begin(), prompts[static_cast<size_t>(i)].end());
    const BatchGenerateResult r = generate_batch(model, batch, opts);
    std::vector<ResponseSample> samples;
    for (int64_t i = b0; i < b1; ++i) {
      const size_t row = static_cast<size_t>(i - b0);
      ResponseSample s;
      s.prompt = prompts[static_cast<size_t>(i)];
      s.response.assign(r.tokens[row].begin(), r.tokens[row].end());
      s.stop = r.stop[row] == StopReason::Eos ? ResponseStop::Eos : ResponseStop::MaxNewTokens;
      s.line = records[static_cast<size_t>(i)].line;
      s.id = records[static_cast<size_t>(i)].id;
      new_tokens += static_cast<int64_t>(s.response.size());
      samples.push_back(std::move(s));
    }
    writer.append(samples);
    if (live || lines) {
      const double t = clock.seconds();
      const double rate = (b1 - first) / std::max(t, 1e-9);
      char buf[200];
      std::snprintf(buf, sizeof buf, "prepare responses: %lld / %lld prompts, %.1f tokens/s, ETA %s",
                    static_cast<long long>(b1), static_cast<long long>(n), new_tokens / std::max(t, 1e-9),
                    fmt_duration((n - b1) / std::max(rate, 1e-9)).c_str());
      if (live) std::cerr << "\r" << buf << "\x1b[K" << (b1 == n ? "\n" : "") << std::flush;
      else std::cerr << buf << "\n" << std::flush;
    }
  }
  writer.close();
  fs::rename(partial, a.out, ec);
  KVD_CHECK(!ec, a.out, ": cannot rename ", partial, " into place (", ec.message(), ")");
  std::cout << "prepare responses: " << a.out << ": " << n << " responses (" << n - first << " generated now, "
            << new_tokens << " tokens in " << clock.seconds() << " s)\n";
  return 0;
}

int inspect_responses(const InspectArgs& a) {
  const ResponsesReader r = a.model.empty() ? ResponsesReader::open(a.data, ResponsesReader::Complete::No)
                                            : ResponsesReader::open(a.data, Tokenizer::from_file(a.model),
                                                                    ResponsesReader::Complete::No);
  const ResponsesInfo& i = r.info();
  int64_t eos = 0;
  for (int64_t k = 0; k < r.size(); ++k) eos += r.get(k).stop == ResponseStop::Eos;
  json j = {{"file", a.data},
            {"kvdistill_format", i.stamp.format},
            {"format_version", i.stamp.version},
            {"tokenizer_sha256", i.stamp.tokenizer_sha256},
            {"model_id", i.stamp.model_id},
            {"tokenizer_checked", !a.model.empty()},
            {"max_new_tokens", i.settings.max_new_tokens},
            {"batch", i.settings.batch},
            {"sampling", i.settings.sampling},
            {"prompts_sha256", i.settings.prompts_sha256},
            {"chat_template", i.settings.chat_template},
            {"num_prompts", i.settings.num_prompts},
            {"num_done", i.num_done},
            {"prompt_tokens", r.num_prompt_tokens()},
            {"response_tokens", r.num_response_tokens()},
            {"stopped_on_eos", eos}};
  std::cout << j.dump(2) << "\n";
  return 0;
}

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
  {
    const h5::File f = h5::File::open(a.data);
    // (A file labelled "responses" without its datasets goes to the packed_text reader, whose error names
    // both formats; tests/python/test_prepare_text.py relabels a packed_text file that way.)
    if (f.has_attr("kvdistill_format") && f.attr_string("kvdistill_format") == kResponsesFormat &&
        f.has("response_tokens"))
      return inspect_responses(a);
  }
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
  CLI::App* prep =
      root.add_subcommand("prepare", "Make datasets from a model and a corpus (text, inspect, tasks, prompts, responses)");
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
  CLI::App* inspect =
      prep->add_subcommand("inspect", "Check a packed_text or responses .h5 file and print a JSON summary");
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

  // prepare prompts
  auto pp = std::make_shared<PromptSetOptions>();
  CLI::App* pr = prep->add_subcommand("prompts", "Cut a deterministic prompt set (JSONL) from text files");
  pr->add_option("--input", pp->inputs, "Text, .md, .rst or .jsonl files, or directories")->required()->expected(1, -1);
  pr->add_option("--out", pp->out, "Output .jsonl file")->required();
  pr->add_option("--count", pp->count, "Prompts to write")->required();
  pr->add_option("--seed", pp->seed, "Seed (the same seed gives a byte-identical file)")->capture_default_str();
  pr->add_option("--model", pp->model_dir, "Measure passages in this model's tokens (default: in words)");
  pr->add_option("--passage-tokens", pp->passage_tokens, "Passage length")->capture_default_str();
  (*runs)[pr] = [pp] {
    const PromptSetStats s = make_prompt_set(*pp);
    std::cout << "prepare prompts: " << pp->out << ": " << s.prompts << " prompts drawn from " << s.passages
              << " passages\n";
    return 0;
  };

  // prepare responses
  auto ra = std::make_shared<ResponsesArgs>();
  CLI::App* rs = prep->add_subcommand("responses", "Generate the model's own greedy responses to prompts (HDF5)");
  rs->add_option("--model", ra->model, "Model directory (the frozen model; its chat template wraps the prompts)")->required();
  rs->add_option("--prompts", ra->prompts, "Prompts JSONL: {\"prompt\": ...} or {\"messages\": [...]} per line")->required();
  rs->add_option("--out", ra->out, "Output .h5 (built in <out>.partial, renamed when complete)")->required();
  rs->add_option("--max-new-tokens", ra->max_new_tokens, "Generation limit per prompt")->required();
  rs->add_option("--batch", ra->batch, "Prompts generated together")->capture_default_str();
  rs->add_option("--device", ra->device, "auto (cuda if present) | cpu | cuda | cuda:N")->capture_default_str();
  rs->add_flag("--overwrite", ra->overwrite, "Start over, replacing <out> and any interrupted <out>.partial");
  rs->add_option("--progress", ra->progress, "auto (live on a terminal), lines, never")
      ->check(CLI::IsMember({"auto", "lines", "never"}))
      ->capture_default_str();
  (*runs)[rs] = [ra] { return run_responses(*ra); };

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
