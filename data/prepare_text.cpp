#include "data/prepare_text.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <filesystem>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "common/error.h"
#include "common/fs.h"
#include "data/h5.h"
#include "data/packed_text.h"
#include "models/chat_template.h"
#include "models/tokenizer.h"

namespace kvd {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The token appended to every document: the tokenizer's end-of-text token.
int32_t resolve_separator(const Tokenizer& tok, const std::string& spec) {
  if (spec == "none") return -1;
  if (spec != "auto") {
    const auto id = tok.token_id(spec);
    KVD_CHECK(id.has_value(), "--separator '", spec, "' is not a token of ", tok.path(),
              "; pass a token string such as <|endoftext|>, or auto / none");
    return *id;
  }
  for (const char* t : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"}) {
    if (const auto id = tok.token_id(t)) return *id;
  }
  return -1;
}

// Live progress on stderr (data/prepare_text.h, Progress).
class ProgressLine {
 public:
  explicit ProgressLine(Progress mode) {
    const bool tty = ::isatty(STDERR_FILENO) != 0;
    live_ = mode == Progress::Auto && tty;
    lines_ = mode == Progress::Lines || (mode == Progress::Auto && !tty);
  }
  void update(uint64_t bytes, uint64_t total, int64_t tokens, int64_t docs, bool final = false) {
    if (!live_ && !lines_) return;
    const double t = seconds_since(t0_);
    const double every = live_ ? 0.5 : 10.0;
    if (!final && t - last_ < every) return;
    last_ = t;
    char buf[256];
    std::snprintf(buf, sizeof buf, "prepare text: %.1f / %.1f MB read (%.0f%%), %.2fM tokens, %lld docs, %.0f docs/s, %.1f MB/s",
                  bytes / 1e6, total / 1e6, total ? 100.0 * bytes / total : 100.0, tokens / 1e6,
                  static_cast<long long>(docs), t > 0 ? docs / t : 0.0, t > 0 ? bytes / 1e6 / t : 0.0);
    if (live_) {
      std::cerr << "\r" << buf << "\x1b[K" << (final ? "\n" : "") << std::flush;
    } else if (!final) {
      std::cerr << buf << "\n" << std::flush;
    }
  }
  // Ends a live line before an error message is printed.
  void abandon() {
    if (live_ && last_ > 0) std::cerr << "\n" << std::flush;
  }

 private:
  Clock::time_point t0_ = Clock::now();
  double last_ = 0;
  bool live_ = false, lines_ = false;
};

// One document in flight between the reader and the writer.
struct Job {
  std::string text, source;
  std::vector<int32_t> ids;  // (n) tokens, separator included; filled by a worker
  Split split = Split::Train;
  uint64_t charge = 0;  // bytes counted against the in-flight bound
  std::exception_ptr error;
  bool done = false;
};

// Tokenizes jobs on worker threads; the owner collects them in submission order.
class TokenizerPool {
 public:
  TokenizerPool(const Tokenizer& tok, int32_t separator, uint64_t seed, double val_fraction, int threads)
      : tok_(tok), sep_(separator), seed_(seed), val_fraction_(val_fraction) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~TokenizerPool() {
    {
      std::lock_guard<std::mutex> g(m_);
      closing_ = true;
      todo_.clear();
    }
    cv_work_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  void submit(std::shared_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> g(m_);
      todo_.push_back(job);
    }
    cv_work_.notify_one();
  }
  // Blocks until `job` is done.
  void wait(const Job& job) {
    std::unique_lock<std::mutex> g(m_);
    cv_done_.wait(g, [&] { return job.done; });
  }
  bool is_done(const Job& job) {
    std::lock_guard<std::mutex> g(m_);
    return job.done;
  }

  // What a worker does to one job (also used inline).
  void process(Job& job) const {
    try {
      job.split = split_of(seed_, job.text, val_fraction_);
      job.ids = tok_.encode(job.text, AddSpecial::Yes);
      if (sep_ >= 0) job.ids.push_back(sep_);
    } catch (const Error& e) {
      job.error = std::make_exception_ptr(Error(job.source + ": " + e.what()));
    } catch (...) {
      job.error = std::current_exception();
    }
    std::string().swap(job.text);  // the text is no longer needed
  }

 private:
  void work() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_work_.wait(g, [&] { return closing_ || !todo_.empty(); });
        if (todo_.empty()) return;
        job = std::move(todo_.front());
        todo_.pop_front();
      }
      process(*job);
      {
        std::lock_guard<std::mutex> g(m_);
        job->done = true;
      }
      cv_done_.notify_all();
    }
  }

  const Tokenizer& tok_;
  int32_t sep_;
  uint64_t seed_;
  double val_fraction_;
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<std::shared_ptr<Job>> todo_;
  bool closing_ = false;
  std::vector<std::thread> workers_;
};

std::string model_id_of(const std::string& model_dir) {
  std::error_code ec;
  fs::path p = fs::canonical(model_dir, ec);
  if (ec) p = fs::path(model_dir);
  if (!fs::is_directory(p, ec)) p = p.parent_path();  // a path to tokenizer.json
  return p.filename().string();
}

PrepareTextStats write_packed(const PrepareTextOptions& opt, const std::string& tmp_path) {
  const auto t0 = Clock::now();
  PrepareTextStats stats;

  const Tokenizer tok = Tokenizer::from_file(opt.model_dir);
  stats.separator_id = resolve_separator(tok, opt.separator);

  // Chat JSONL lines are rendered with the model's chat template, loaded on first use.
  auto chat = std::make_shared<std::optional<ChatTemplate>>();
  DocumentOptions dopt;
  dopt.max_doc_bytes = opt.max_doc_bytes;
  dopt.invalid_utf8 = opt.invalid_utf8;
  const std::string model_dir = opt.model_dir;
  dopt.chat = [chat, model_dir](const std::vector<ChatMessage>& msgs, const std::string& where) {
    if (!chat->has_value()) {
      try {
        chat->emplace(ChatTemplate::from_file(model_dir));
      } catch (const Error& e) {
        KVD_FAIL(where, ": chat messages need the model's chat template: ", e.what(),
                 "; or write the conversation as {\"text\": ...} lines");
      }
    }
    try {
      return (*chat)->render(msgs, AddGenerationPrompt::No);
    } catch (const Error& e) {
      KVD_FAIL(where, ": ", e.what());
    }
  };
  DocumentReader reader(list_inputs(opt.inputs), dopt);

  h5::File file = h5::File::create(tmp_path);
  write_stamp(file, {kPackedTextFormat, kPackedTextVersion, tok.sha256(), model_id_of(opt.model_dir)});
  h5::DatasetOptions dsopt;
  dsopt.chunk = opt.chunk;
  dsopt.deflate = opt.deflate;
  PackedSplitWriter train(file, Split::Train, opt.seq_len, dsopt);
  PackedSplitWriter val(file, Split::Val, opt.seq_len, dsopt);

  const int threads = opt.threads > 0 ? opt.threads
                                      : std::max(1, std::min(8, static_cast<int>(std::thread::hardware_concurrency())));
  TokenizerPool pool(tok, stats.separator_id, opt.seed, opt.val_fraction, threads);
  ProgressLine progress(opt.progress);

  // Documents in flight, in input order; bounded in bytes and in count.
  std::deque<std::shared_ptr<Job>> window;
  uint64_t in_flight_bytes = 0;
  const uint64_t max_in_flight_bytes = std::max<uint64_t>(8u << 20, 4 * static_cast<uint64_t>(threads) * opt.max_doc_bytes);
  const size_t max_in_flight_docs = 256 * static_cast<size_t>(threads);
  int64_t tokens = 0;

  // Takes the oldest document (waiting for it if `block`), appends it to its split. False if none is ready.
  auto write_front = [&](bool block) {
    if (window.empty()) return false;
    Job& job = *window.front();
    if (!pool.is_done(job)) {
      if (!block) return false;
      pool.wait(job);
    }
    if (job.error) std::rethrow_exception(job.error);
    PackedSplitWriter& w = job.split == Split::Train ? train : val;
    w.add_document(job.ids, stats.documents++);
    tokens += static_cast<int64_t>(job.ids.size());
    in_flight_bytes -= job.charge;
    window.pop_front();
    return true;
  };

  try {
    Document doc;
    while (reader.next(doc)) {
      auto job = std::make_shared<Job>();
      job->charge = doc.text.size() * 2 + doc.source.size() + 64;  // the text, then about as many bytes of ids
      in_flight_bytes += job->charge;
      job->text = std::move(doc.text);
      job->source = std::move(doc.source);
      window.push_back(job);
      pool.submit(job);
      while (write_front(false)) {
      }
      while (in_flight_bytes > max_in_flight_bytes || window.size() > max_in_flight_docs) write_front(true);
      progress.update(reader.bytes_read(), reader.total_bytes(), tokens, stats.documents);
    }
    while (write_front(true)) {
    }
  } catch (...) {
    progress.abandon();
    throw;
  }

  train.finish();
  val.finish();
  stats.bytes = reader.bytes_read();
  file.set_attr("seq_len", opt.seq_len);
  file.set_attr("separator_id", static_cast<int64_t>(stats.separator_id));
  file.set_attr("seed", static_cast<int64_t>(opt.seed));
  file.set_attr("val_fraction", opt.val_fraction);
  file.set_attr("num_documents", stats.documents);
  file.set_attr("source_bytes", static_cast<int64_t>(stats.bytes));
  file.close();

  for (Split s : {Split::Train, Split::Val}) {
    const PackedSplitWriter& w = s == Split::Train ? train : val;
    const int k = static_cast<int>(s);
    stats.tokens[k] = w.num_tokens();
    stats.sequences[k] = w.num_sequences();
    stats.split_documents[k] = w.num_documents();
  }
  progress.update(stats.bytes, reader.total_bytes(), tokens, stats.documents, /*final=*/true);
  stats.seconds = seconds_since(t0);
  return stats;
}

}  // namespace

PrepareTextStats prepare_text(const PrepareTextOptions& opt) {
  KVD_CHECK(opt.seq_len >= 2 && opt.seq_len <= (int64_t{1} << 30), "--seq-len ", opt.seq_len,
            ": must be between 2 and 2^30");
  KVD_CHECK(opt.val_fraction >= 0 && opt.val_fraction < 1, "--val-fraction ", opt.val_fraction, ": must be in [0, 1)");
  KVD_CHECK(!opt.out.empty(), "--out: an output .h5 path is required");
  make_parent_dirs(opt.out);
  std::error_code ec;
  const std::string tmp = opt.out + ".tmp." + std::to_string(::getpid());
  try {
    PrepareTextStats stats = write_packed(opt, tmp);
    const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);  // on disk before it is renamed into place
    KVD_CHECK(fd >= 0, tmp, ": cannot reopen the finished file for fsync");
    const int rc = ::fsync(fd);
    ::close(fd);
    KVD_CHECK(rc == 0, tmp, ": fsync failed; is the disk full?");
    fs::rename(tmp, opt.out, ec);
    KVD_CHECK(!ec, opt.out, ": cannot rename ", tmp, " into place (", ec.message(), ")");
    return stats;
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
}

}  // namespace kvd
