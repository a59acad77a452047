// Training readers over packed sequences (data/packed_text.h, or a responses file packed by
// data/responses.h, through SequenceSource): deterministic shuffling by seed and
// epoch, sharding by (rank, world size), a cursor that a checkpoint saves and restores, and prefetch
// on a background thread. Torch-free: batches are int32 vectors in row-major (B, L) layout.
//
// The plan of an epoch (the same on every rank, computed from the seed alone):
//   order  = a Fisher-Yates permutation of [0, n) drawn from Rng(seed, epoch) (data/random.h)
//   global batch g = order[g*B : (g+1)*B]
//   rank r gets global batches g = r, r + W, r + 2W, ...; its step k is global batch k*W + r.
// Shards are disjoint by construction. With Remainder::Uneven they cover the epoch exactly (the last
// global batch may be short, and ranks may differ by one step); with Remainder::DropTail every rank
// gets the same number of full batches, floor(n / (B*W)), and the at most B*W - 1 left-over sequences
// (a different set each epoch, since the order is reshuffled) are skipped.
//
// The cursor (epoch, step) is the position of the *next* batch a rank will yield. A loader created
// with a saved cursor yields exactly the batches the uninterrupted loader would have yielded next.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/packed_text.h"

namespace kvd {

enum class Remainder { DropTail, Uneven };
enum class Shuffle { Yes, No };

struct SamplerOptions {
  int64_t batch_size = 8;
  uint64_t seed = 0;
  int64_t rank = 0;
  int64_t world_size = 1;
  Remainder remainder = Remainder::DropTail;
  Shuffle shuffle = Shuffle::Yes;
};

struct Cursor {
  int64_t epoch = 0;
  int64_t step = 0;  // batches this rank has yielded in `epoch`
  bool operator==(const Cursor& o) const { return epoch == o.epoch && step == o.step; }
};

// Which sequences each rank reads, batch by batch (pure: no I/O, no state but a one-epoch cache).
class ShardedSampler {
 public:
  ShardedSampler(int64_t num_items, SamplerOptions opt);
  int64_t num_items() const { return n_; }
  const SamplerOptions& options() const { return opt_; }
  // Steps this rank takes per epoch.
  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  // The order of all n items in `epoch` (the same on every rank).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // Item indices of this rank's batch `step` of `epoch` (size batch_size, or less for Uneven's last).
  std::vector<int64_t> batch(int64_t epoch, int64_t step);
  // The cursor after `c`.
  Cursor advance(Cursor c) const;

 private:
  int64_t n_;
  SamplerOptions opt_;
  int64_t batches_per_epoch_ = 0;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> cached_order_;
};

// The cursor as JSON, with the settings it is only valid for:
//   {"epoch": 3, "step": 120, "seed": 0, "rank": 0, "world_size": 2, "batch_size": 8,
//    "num_items": 12345, "remainder": "drop_tail", "shuffle": true}
nlohmann::json cursor_to_json(const Cursor& c, const ShardedSampler& s);
// Reads a cursor saved by cursor_to_json, checking it against the sampler it will drive; a mismatch
// (another seed, world size, batch size, dataset size...) throws, naming `context` and the field.
Cursor cursor_from_json(const nlohmann::json& j, const ShardedSampler& s, const std::string& context);

// What a Loader reads: random access to packed sequences of at most seq_len tokens. Implementations must be
// safe to call from the loader's background thread while the caller holds its own copy.
class SequenceSource {
 public:
  virtual ~SequenceSource() = default;
  virtual int64_t size() const = 0;
  virtual int64_t seq_len() const = 0;
  // Sequence i; fills `targets` (L) with 1 where the token is a training target (the label of the position
  // before it) and 0 where it is not (e.g. prompt tokens), or leaves it empty when every token is one.
  virtual PackedSequence get(int64_t i, std::vector<uint8_t>& targets) const = 0;
};

// A packed_text split as a SequenceSource (every token is a target). The PackedTextReader it came from must
// stay open while it is read (a split does not keep the file open).
class PackedSource : public SequenceSource {
 public:
  explicit PackedSource(PackedSplitReader split) : split_(std::move(split)) {}
  int64_t size() const override { return split_.size(); }
  int64_t seq_len() const override { return split_.seq_len(); }
  PackedSequence get(int64_t i, std::vector<uint8_t>& targets) const override {
    targets.clear();
    return split_.get(i);
  }

 private:
  PackedSplitReader split_;
};

// A batch of packed sequences, padded to the dataset's seq_len.
struct Batch {
  int64_t epoch = 0, step = 0;     // its place in the plan (the cursor before it)
  int64_t rows = 0, cols = 0;      // B, L
  std::vector<int64_t> indices;    // (B) sequence indices in the split
  std::vector<int32_t> tokens;     // (B, L) token ids; pad_id after each row's length
  std::vector<int32_t> positions;  // (B, L) position within the segment (0 at each segment start; 0 on padding)
  std::vector<int32_t> segments;   // (B, L) segment number within the row; -1 on padding
  std::vector<int32_t> lengths;    // (B) tokens per row
  std::vector<uint8_t> targets;    // (B, L) 1 where the token is a training target; 0 on padding and on
                                   // tokens the source marks as context only (a responses file's prompts)
};

// Sequences `indices` of `source` as one batch of `cols` columns (each row padded with pad_id after its
// length; rows longer than cols are refused as a corrupt file). The loader's batches are made here, and so are
// the trainer's held-out ones.
Batch read_sequences(const SequenceSource& source, const std::vector<int64_t>& indices, int64_t cols, int32_t pad_id);

struct LoaderOptions {
  SamplerOptions sampler;
  int prefetch = 2;    // batches prepared ahead on a background thread; 0 reads in next()
  int32_t pad_id = 0;  // token id of padding (masked out by segments == -1 anyway)
};

class Loader {
 public:
  Loader(PackedSplitReader split, LoaderOptions opt, Cursor start = {});
  Loader(std::shared_ptr<const SequenceSource> source, LoaderOptions opt, Cursor start = {});
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // The batch at cursor(); advances the cursor (into the next epoch after the last step). Rethrows any
  // error of the background reader.
  Batch next();
  // Position of the next batch: save it with a checkpoint, pass it back to the constructor to resume.
  Cursor cursor() const { return cursor_; }
  const ShardedSampler& sampler() const { return sampler_; }
  int64_t batches_per_epoch() const { return sampler_.batches_per_epoch(); }

 private:
  Batch read_batch(Cursor c, ShardedSampler& sampler) const;
  void produce();

  std::shared_ptr<const SequenceSource> source_;
  LoaderOptions opt_;
  ShardedSampler sampler_;         // used by next() when prefetch == 0
  ShardedSampler thread_sampler_;  // used by the background thread
  Cursor cursor_;

  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Batch> ready_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace kvd
