// Greedy decoding with fixed shapes, for CUDA graphs.
//
// KVCache grows each head's segment as tokens arrive and reallocates on eviction, so every decode step has new
// shapes and addresses and launches its ~20 kernels per layer one by one from the host (a 135M model's batched
// step is launch-bound: bench/RESULTS.md). A StaticDecodeState copies a cache's entries once into buffers of a
// fixed capacity per head, C = the longest head + the steps to come, with each head's entry count on the device.
// A step (Model::decode_static) then appends at slot len[s], attends over each head's own entries with the
// ragged decode kernel (kernels/decode_attention.h), picks the argmax and feeds it to the next step, all on the
// device with fixed shapes: StaticDecoder captures one step in a CUDA graph and replays it.
//
// After decoding, write_back appends each row's decoded entries (only the tokens that row really fed: a finished
// row's later steps are dropped) to the KVCache in one call per layer, so the cache, its byte counts and peaks
// are what step-by-step decoding leaves.
//
// Eviction while decoding (StaticStepEvictor, e.g. DecodeEvictor::static_evictor): in every layer, right after
// the step's attention, the evictor may empty slots by writing -1 into the layer's positions. Nothing moves: the
// attention skips empty slots (EmptySlots::NegativePosition), a segment keeps growing by one slot a step (C has
// room for every step), and write_back drops the emptied entries from the KVCache (ragged per head). The state
// then also tracks, on the device, which rows still feed tokens (eos, limits), since a finished row stops
// evicting exactly where step-by-step decoding stops feeding it.
//
// Per-entry payload (KVCache payload columns, e.g. TRIM-KV's log β): the state holds one buffer per column and
// layer in the same slots as the entries. make_static_decode copies the cache's columns; an evictor adds its own
// (StaticStepEvictor::attach) and writes each step's value into slot len[s] - 1; write_back carries the columns of
// the decoded entries to the cache, as step-by-step decoding's on_append writes them. Per-row state (the
// Attention-Gate's keys and values by position) comes from the cache as it is, an evictor sizes it for every step
// before the first (Scorer::reserve_row_state), its steps write it in place, and write_back hands it to the cache.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "models/kv_cache.h"

namespace kvd {

class KVCache;
class Model;
struct StaticDecodeState;

// Eviction inside a fixed-shape decode step. Everything it runs must stay on the device with fixed shapes (no
// read-back, no host-dependent shapes), so that a CUDA graph can capture it.
class StaticStepEvictor {
 public:
  virtual ~StaticStepEvictor() = default;
  // Called once by attach_evictor, before the first step: adds the payload columns it writes (with their fill in
  // every slot) to s.payload_columns / s.payload where the state lacks them.
  virtual void attach(StaticDecodeState& s) { (void)s; }
  // Layer `layer` of the current step, right after its attention: q (B, H, hd) the step's post-RoPE queries, hidden
  // (B, 1, d) the layer's attention input (after its input norm). The step's entry is already at slot len[s] - 1 of
  // each segment; s.alive (B) marks the rows that feed this step, s.fed (B) how many steps each fed before it,
  // s.host_step the step's index. Evicts by writing -1 into s.pos[layer], and subtracts from s.entries (B) the
  // entries it took from each row.
  virtual void on_layer(int64_t layer, const at::Tensor& q, const at::Tensor& hidden, StaticDecodeState& s) = 0;
  // Which ops step `step` (0-based) runs: steps of equal variants run the same ones, so a CUDA graph captured at one
  // replays them all (e.g. 1 at the steps where an every-N-steps trigger fires, 0 at the others).
  virtual int64_t variant(int64_t step) const {
    (void)step;
    return 0;
  }
};

struct StaticDecodeState {
  int64_t batch = 0, kv_heads = 0, head_dim = 0;
  int64_t capacity = 0;   // C: slots per (row, KV head) segment
  int64_t max_steps = 0;  // steps this state has room for
  at::Tensor tok;         // (B, 1) int64: the step's input tokens; the step overwrites them with its argmax
  at::Tensor qpos;        // (B, 1) int64: their positions; +1 per step
  at::Tensor start;       // (B * H_kv) int64: segment s starts at row s * C
  std::vector<at::Tensor> k, v;  // [layer] (B * H_kv * C, hd) flat rows in the model dtype
  std::vector<at::Tensor> pos;   // [layer] (B * H_kv * C) int64 stored positions (-1: empty)
  std::vector<at::Tensor> len;   // [layer] (B * H_kv) int64 entries held; +1 per step
  std::vector<PayloadColumn> payload_columns;      // the per-entry columns the state carries
  std::vector<std::vector<at::Tensor>> payload;    // [layer][column] (B * H_kv * C) in the column's dtype
  std::vector<RowState> row_state;          // [layer] the cache's per-row state (KVCache::row_state), shared with it
                                           // until an evictor's scorer grows it (reserve_row_state); written back
  std::vector<std::vector<int64_t>> len0;  // [layer][B * H_kv] entries held before the first step (host)
  std::vector<int64_t> next0;              // [B] positions of the first step's tokens (host)
  at::Tensor history;     // (max_steps, B) int64: the token step i chose
  at::Tensor step;        // (1) int64: steps run so far, on the device
  // Eviction while decoding (attach_evictor): slots with pos -1 are empty.
  std::shared_ptr<StaticStepEvictor> evictor;
  at::Tensor alive;  // (B) bool: rows that feed the next step
  at::Tensor fed;    // (B) int64: steps each row fed so far (its decoded entries are the slots len0 .. len0 + fed - 1)
  at::Tensor limit;  // (B) int64: the most steps each row may feed (the tokens it may still produce at the start)
  at::Tensor eos;    // (E) int64: tokens that stop a row
  // The entries each row holds (all layers and KV heads) as step-by-step decoding would hold them, and their peaks
  // (B) / (1): counted after each layer's append, before its eviction, as KVCache counts its peaks.
  at::Tensor entries, peak, peak_total;
  int64_t host_step = 0;  // the index of the step being run (set by StaticDecoder)
};

// Copies cache's entries into a state with room for `steps` more tokens per row. first (B) are the tokens the
// first step feeds (at positions cache.next_position(b)).
StaticDecodeState make_static_decode(const Model& model, const KVCache& cache, const std::vector<int64_t>& first,
                                     int64_t steps);

// Lets `evictor` evict inside every step of s, made from `cache`. alive[b]: row b feeds the first step; limit[b]: the
// tokens it may still produce; eos: the tokens that stop a row. A row stops feeding (and evicting) after a step that produced
// an eos token or its last allowed one.
void attach_evictor(StaticDecodeState& s, std::shared_ptr<StaticStepEvictor> evictor, const KVCache& cache,
                    const std::vector<bool>& alive, const std::vector<int64_t>& limit, const std::vector<int64_t>& eos);

// Adds a payload column to s (every layer; every slot holds `col.fill`); a no-op where s has one of that name.
void add_static_payload(StaticDecodeState& s, const PayloadColumn& col);

// Bytes a state for `cache` with room for `steps` more tokens takes (every head padded to the longest + steps),
// and whether that is at most half of the device's free memory (always true on the CPU): generate_batch's Auto
// path falls back to the cache path where it is not.
int64_t static_decode_bytes(const KVCache& cache, int64_t steps);
bool static_decode_fits(const KVCache& cache, int64_t steps);

// Appends to `cache` row b's first fed[b] decoded entries of every layer and head (in step order) and advances
// its positions by fed[b]: what fed[b] decode steps of that row would have appended. With an evictor, the
// entries it emptied are left out: those held before decoding are dropped from the cache first, then each head
// gains only its own surviving decoded entries. The entries, counts, bytes and peaks are then those of
// step-by-step eviction (the peaks counted on the device while decoding: a layer's appended entries count before
// its eviction). With an evictor, the state's payload columns go to the cache too (a column the cache lacks is added
// with its fill, then each decoded entry gets its slot's value); the evictor's private state (H2O's sums,
// LazyEviction's counters) is not a payload column and is not written.
void write_back(const StaticDecodeState& s, KVCache& cache, const std::vector<int64_t>& fed);

enum class StepRunner {
  Eager,  // Model::decode_static, launched op by op
  Graph,  // the first step runs eagerly and captures a CUDA graph of one step, which later steps replay (CUDA)
};

// Runs steps of a state and hands their tokens to the host in blocks (one device read per `block` steps).
class StaticDecoder {
 public:
  StaticDecoder(const Model& model, StaticDecodeState& state, StepRunner runner, int64_t block = 8);
  ~StaticDecoder();
  StaticDecoder(const StaticDecoder&) = delete;
  StaticDecoder& operator=(const StaticDecoder&) = delete;
  // The tokens (B) of the next step; runs up to `block` steps (never past max_steps) when none are buffered.
  std::vector<int64_t> next();

 private:
  void run_step();
  const Model& model_;
  StaticDecodeState& s_;
  StepRunner runner_;
  int64_t block_, run_ = 0, read_ = 0;
  std::vector<int64_t> host_;  // (run_ x B) the tokens read back so far, step by step
  struct Graph;
  std::unique_ptr<Graph> graph_;  // one CUDA graph per variant of the evictor's steps (one without an evictor)
};

}  // namespace kvd
