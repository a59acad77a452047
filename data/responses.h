// Responses: the HDF5 dataset `kvdistill prepare responses` writes (the frozen model's own greedy answers to
// a set of prompts) and the trainer reads as completion-only training data.
//
// Each sample is one prompt line of the prompts JSONL (data/prompts.h): the prompt rendered with the model's
// chat template (generation prompt included) and tokenized, and the tokens the model generated after it.
//
// File layout (kvdistill_format "responses", format_version 1):
//
//   /                      attributes
//     kvdistill_format     "responses"
//     format_version       1
//     tokenizer_sha256     sha256 of the model's tokenizer.json (checked against the model on reading)
//     model_id             the model directory's name, e.g. "SmolLM2-135M-Instruct"
//     max_new_tokens       generation limit per prompt
//     batch                prompts generated together (left-padded)
//     sampling             "greedy"
//     prompts_sha256       sha256 of the prompts file's bytes
//     chat_template        the chat format the prompts were rendered with: "chatml" or "llama3"
//     num_prompts          prompts in the prompts file (the samples of a complete file)
//     num_done             samples stored (== num_prompts once complete; less in an interrupted
//                          "<out>.partial" file, which resumes after them)
//   datasets (at the root), N = num_done samples
//     prompt_tokens     int32 [P]    prompt token ids, sample after sample                chunked, deflate
//     prompt_offsets    int64 [N+1]  CSR: sample i's prompt is prompt_tokens[prompt_offsets[i] : prompt_offsets[i+1]]
//     response_tokens   int32 [R]    generated token ids (the eos token included when it stopped generation)
//     response_offsets  int64 [N+1]  CSR over response_tokens
//     stop_reason       int32 [N]    0 = eos, 1 = max_new_tokens (int32: the h5 layer has no int8 datasets)
//     prompt_lines      int64 [N]    1-based line of the sample's prompt in the prompts file
//     id_bytes          int32 [I]    UTF-8 bytes (0..255) of the samples' ids, one byte per element
//     id_offsets        int64 [N+1]  CSR over id_bytes; an id is the line's "id" (a JSON string as is,
//                                    anything else as its JSON text), or the line number when absent
//
// Training view (ResponsesSplit): samples are split into train / val by a hash of their prompt tokens
// (split_of_prompt below, the same rule as packed_text's documents), then packed in file order into sequences
// of at most seq_len tokens. A sample is never cut across sequences: it is one segment (positions from 0)
// holding prompt + response, truncated to seq_len tokens if longer (the response's tail is dropped); a sample
// whose prompt alone leaves no room for a response token is skipped. Only response tokens are training
// targets (completion-only): the targets mask is 0 on prompt tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/h5.h"
#include "data/loader.h"
#include "data/packed_text.h"

namespace kvd {

class Tokenizer;

inline constexpr const char* kResponsesFormat = "responses";
inline constexpr int64_t kResponsesVersion = 1;

enum class ResponseStop : int32_t { Eos = 0, MaxNewTokens = 1 };

// The generation settings stored with (and required to match when resuming) a responses file.
struct ResponsesSettings {
  int64_t max_new_tokens = 0;
  int64_t batch = 0;
  std::string sampling = "greedy";
  std::string prompts_sha256;
  std::string chat_template;  // "chatml" | "llama3"
  int64_t num_prompts = 0;
};

struct ResponsesInfo {
  h5::Stamp stamp;
  ResponsesSettings settings;
  int64_t num_done = 0;
};

struct ResponseSample {
  std::vector<int32_t> prompt;    // (P) prompt token ids
  std::vector<int32_t> response;  // (R) generated token ids
  ResponseStop stop = ResponseStop::MaxNewTokens;
  int64_t line = 0;               // 1-based line in the prompts file
  std::string id;
};

// Whether a sample goes to val: hash_bytes(seed, its prompt's int32 ids as little-endian bytes) mapped to
// [0, 1) is below val_fraction (data/random.h; the packed_text rule applied to the token bytes).
Split split_of_prompt(uint64_t seed, const std::vector<int32_t>& prompt, double val_fraction);

// How ResponsesWriter::open treats an existing file.
enum class Existing { Resume, Overwrite };

// Appends samples to "<out>.partial", then renames it to <out> when every prompt is done. Each append()
// writes one batch, updates num_done and flushes, so an interrupted run resumes after the last batch.
class ResponsesWriter {
 public:
  // Creates `partial_path`, or (Existing::Resume) reopens it when it exists, after checking that its stamp
  // and settings equal these: a mismatch throws "<file>: was made with max_new_tokens 8, this run asks for
  // 16; use a new --out or pass --overwrite". Trailing data of a batch that was being written when the
  // run was interrupted (beyond num_done) is dropped (the valid part is copied into a fresh file).
  static ResponsesWriter open(const std::string& partial_path, const h5::Stamp& stamp, const ResponsesSettings& s,
                              Existing existing);
  int64_t num_done() const { return num_done_; }
  void append(const std::vector<ResponseSample>& batch);
  void close();

 private:
  static ResponsesWriter create(const std::string& path, const h5::Stamp& stamp, const ResponsesSettings& s);
  h5::File file_;
  h5::Dataset prompt_tokens_, prompt_offsets_, response_tokens_, response_offsets_, stop_, lines_, id_bytes_,
      id_offsets_;
  int64_t num_done_ = 0, prompt_end_ = 0, response_end_ = 0, id_end_ = 0;
};

// Throws unless the stored settings equal `want` ("<file>: was made with <key> <a>, this run asks for <b>;
// use a new --out or pass --overwrite").
void check_same_settings(const std::string& file, const ResponsesInfo& have, const h5::Stamp& stamp,
                         const ResponsesSettings& want);

// Reads a responses file, checking every attribute and the CSR structure.
class ResponsesReader {
 public:
  // Checks format and version (and, with a tokenizer, that the file was made with it). Complete::Yes
  // also requires num_done == num_prompts (a finished file).
  enum class Complete { Yes, No };
  static ResponsesReader open(const std::string& path, Complete complete = Complete::Yes);
  static ResponsesReader open(const std::string& path, const Tokenizer& tokenizer, Complete complete = Complete::Yes);

  const ResponsesInfo& info() const { return info_; }
  const std::string& path() const { return path_; }
  int64_t size() const { return info_.num_done; }
  int64_t prompt_length(int64_t i) const;
  int64_t response_length(int64_t i) const;
  int64_t num_prompt_tokens() const { return prompt_off_.back(); }
  int64_t num_response_tokens() const { return response_off_.back(); }
  ResponseSample get(int64_t i) const;
  // Prompt and response tokens of sample i, the response cut to at most `max_response` tokens.
  void read_tokens(int64_t i, std::vector<int32_t>& prompt, std::vector<int32_t>& response, int64_t max_response) const;

 private:
  static ResponsesReader open_impl(const std::string& path, const Tokenizer* tokenizer, Complete complete);
  std::string path_;
  h5::File file_;
  ResponsesInfo info_;
  h5::Dataset prompt_tokens_, response_tokens_, id_bytes_;
  std::vector<int64_t> prompt_off_, response_off_, id_off_, lines_;
  std::vector<int32_t> stop_;
};

// One split of a responses file, packed for training (see the header comment). Cheap to copy.
class ResponsesSplit : public SequenceSource {
 public:
  ResponsesSplit(ResponsesReader reader, Split split, int64_t seq_len, uint64_t seed, double val_fraction);
  int64_t size() const override { return static_cast<int64_t>(seq_samples_.size()) - 1; }
  int64_t seq_len() const override { return seq_len_; }
  PackedSequence get(int64_t i, std::vector<uint8_t>& targets) const override;
  int64_t num_samples() const { return static_cast<int64_t>(samples_.size()); }
  int64_t skipped() const { return skipped_; }      // samples whose prompt leaves no room for a response token
  int64_t truncated() const { return truncated_; }  // samples cut to seq_len

 private:
  ResponsesReader reader_;
  int64_t seq_len_;
  std::vector<int64_t> samples_;      // sample indices of this split, in file order
  std::vector<int64_t> seq_samples_;  // CSR over samples_: sequence i packs samples_[seq_samples_[i] : [i+1]]
  int64_t skipped_ = 0, truncated_ = 0;
};

}  // namespace kvd
