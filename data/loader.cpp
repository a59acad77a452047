#include "data/loader.h"

#include <algorithm>
#include <numeric>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "data/random.h"

namespace kvd {

using json = nlohmann::json;

// ---- ShardedSampler ------------------------------------------------------------------------------

ShardedSampler::ShardedSampler(int64_t num_items, SamplerOptions opt) : n_(num_items), opt_(opt) {
  KVD_CHECK(opt_.batch_size >= 1, "batch size ", opt_.batch_size, " must be at least 1");
  KVD_CHECK(opt_.world_size >= 1 && opt_.rank >= 0 && opt_.rank < opt_.world_size, "rank ", opt_.rank,
            " is outside world size ", opt_.world_size);
  KVD_CHECK(n_ >= 0, "negative dataset size ", n_);
  const int64_t B = opt_.batch_size, W = opt_.world_size;
  if (opt_.remainder == Remainder::DropTail) {
    batches_per_epoch_ = n_ / (B * W);
  } else {
    const int64_t global = (n_ + B - 1) / B;  // global batches, the last maybe short
    batches_per_epoch_ = global / W + (opt_.rank < global % W ? 1 : 0);
  }
  KVD_CHECK(batches_per_epoch_ > 0, "the dataset has ", n_, " sequences: too few for one batch of ", B, " on each of ",
            W, " ranks; lower the batch size or prepare more data");
}

std::vector<int64_t> ShardedSampler::epoch_order(int64_t epoch) const {
  std::vector<int64_t> order(static_cast<size_t>(n_));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (opt_.shuffle == Shuffle::Yes) {
    Rng rng(opt_.seed, static_cast<uint64_t>(epoch));
    rng.shuffle(order);
  }
  return order;
}

std::vector<int64_t> ShardedSampler::batch(int64_t epoch, int64_t step) {
  KVD_CHECK(epoch >= 0 && step >= 0 && step < batches_per_epoch_, "batch (epoch ", epoch, ", step ", step,
            ") is outside the plan (", batches_per_epoch_, " steps per epoch)");
  if (epoch != cached_epoch_) {
    cached_order_ = epoch_order(epoch);
    cached_epoch_ = epoch;
  }
  const int64_t g = step * opt_.world_size + opt_.rank;  // global batch
  const int64_t begin = g * opt_.batch_size, end = std::min(n_, begin + opt_.batch_size);
  return {cached_order_.begin() + begin, cached_order_.begin() + end};
}

Cursor ShardedSampler::advance(Cursor c) const {
  if (++c.step >= batches_per_epoch_) {
    ++c.epoch;
    c.step = 0;
  }
  return c;
}

json cursor_to_json(const Cursor& c, const ShardedSampler& s) {
  const SamplerOptions& o = s.options();
  return {{"epoch", c.epoch},
          {"step", c.step},
          {"seed", o.seed},
          {"rank", o.rank},
          {"world_size", o.world_size},
          {"batch_size", o.batch_size},
          {"num_items", s.num_items()},
          {"remainder", o.remainder == Remainder::DropTail ? "drop_tail" : "uneven"},
          {"shuffle", o.shuffle == Shuffle::Yes}};
}

Cursor cursor_from_json(const json& j, const ShardedSampler& s, const std::string& context) {
  KVD_CHECK(j.is_object(), context, ": the data cursor must be a JSON object");
  const json expect = cursor_to_json(Cursor{}, s);
  for (const auto& [key, want] : expect.items()) {
    KVD_CHECK(j.contains(key), context, ": data cursor has no \"", key, "\"; the checkpoint is incomplete");
    if (key == "epoch" || key == "step") {
      KVD_CHECK(j[key].is_number_integer() && j[key].get<int64_t>() >= 0, context, ": data cursor \"", key,
                "\" must be a non-negative integer");
      continue;
    }
    KVD_CHECK(j[key] == want, context, ": data cursor was saved with ", key, " = ", j[key].dump(), ", but this run has ",
              want.dump(), "; resume with the same data and settings, or start the data from scratch");
  }
  Cursor c{j["epoch"].get<int64_t>(), j["step"].get<int64_t>()};
  KVD_CHECK(c.step < s.batches_per_epoch(), context, ": data cursor step ", c.step, " is past the ",
            s.batches_per_epoch(), " steps of an epoch");
  return c;
}

// ---- Loader --------------------------------------------------------------------------------------

Loader::Loader(PackedSplitReader split, LoaderOptions opt, Cursor start)
    : Loader(std::make_shared<PackedSource>(std::move(split)), opt, start) {}

Loader::Loader(std::shared_ptr<const SequenceSource> source, LoaderOptions opt, Cursor start)
    : source_(std::move(source)),
      opt_(opt),
      sampler_(source_->size(), opt.sampler),
      thread_sampler_(sampler_),
      cursor_(start) {
  KVD_CHECK(opt_.prefetch >= 0, "prefetch ", opt_.prefetch, " must be >= 0");
  KVD_CHECK(cursor_.epoch >= 0 && cursor_.step >= 0 && cursor_.step < sampler_.batches_per_epoch(), "cursor (epoch ",
            cursor_.epoch, ", step ", cursor_.step, ") is outside the plan (", sampler_.batches_per_epoch(),
            " steps per epoch)");
  if (opt_.prefetch > 0) worker_ = std::thread([this] { produce(); });
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> g(m_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

Batch read_sequences(const SequenceSource& source, const std::vector<int64_t>& indices, int64_t cols, int32_t pad_id) {
  Batch b;
  b.indices = indices;
  b.rows = static_cast<int64_t>(b.indices.size());
  b.cols = cols;
  const size_t cells = static_cast<size_t>(b.rows * b.cols);
  b.tokens.assign(cells, pad_id);
  b.positions.assign(cells, 0);
  b.segments.assign(cells, -1);
  b.targets.assign(cells, 0);
  b.lengths.resize(static_cast<size_t>(b.rows));
  std::vector<uint8_t> targets;
  for (int64_t r = 0; r < b.rows; ++r) {
    const PackedSequence s = source.get(b.indices[static_cast<size_t>(r)], targets);
    KVD_CHECK(static_cast<int64_t>(s.tokens.size()) <= b.cols && (targets.empty() || targets.size() == s.tokens.size()),
              "sequence ", s.index, " has ", s.tokens.size(), " tokens (", targets.size(),
              " targets), more than seq_len ", b.cols, "; the data file is corrupt");
    const size_t row = static_cast<size_t>(r * b.cols);
    std::copy(s.tokens.begin(), s.tokens.end(), b.tokens.begin() + row);
    std::copy(s.positions.begin(), s.positions.end(), b.positions.begin() + row);
    std::copy(s.segments.begin(), s.segments.end(), b.segments.begin() + row);
    if (targets.empty())
      std::fill(b.targets.begin() + row, b.targets.begin() + row + s.tokens.size(), uint8_t{1});
    else
      std::copy(targets.begin(), targets.end(), b.targets.begin() + row);
    b.lengths[static_cast<size_t>(r)] = static_cast<int32_t>(s.tokens.size());
  }
  return b;
}

Batch Loader::read_batch(Cursor c, ShardedSampler& sampler) const {
  Batch b = read_sequences(*source_, sampler.batch(c.epoch, c.step), source_->seq_len(), opt_.pad_id);
  b.epoch = c.epoch;
  b.step = c.step;
  return b;
}

void Loader::produce() {
  Cursor c = cursor_;
  for (;;) {
    {
      std::unique_lock<std::mutex> g(m_);
      cv_.wait(g, [&] { return stop_ || static_cast<int>(ready_.size()) < opt_.prefetch; });
      if (stop_) return;
    }
    try {
      Batch b = read_batch(c, thread_sampler_);
      std::lock_guard<std::mutex> g(m_);
      ready_.push_back(std::move(b));
    } catch (...) {
      std::lock_guard<std::mutex> g(m_);
      error_ = std::current_exception();
      cv_.notify_all();
      return;
    }
    cv_.notify_all();
    c = thread_sampler_.advance(c);
  }
}

Batch Loader::next() {
  Batch b;
  if (opt_.prefetch == 0) {
    b = read_batch(cursor_, sampler_);
  } else {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [&] { return !ready_.empty() || error_; });
    if (ready_.empty()) std::rethrow_exception(error_);
    b = std::move(ready_.front());
    ready_.pop_front();
    g.unlock();
    cv_.notify_all();
  }
  cursor_ = sampler_.advance(cursor_);
  return b;
}

}  // namespace kvd
