// Packed text: the HDF5 dataset `kvdistill prepare text` writes and the trainer reads.
//
// Documents are tokenized, then concatenated per split into one token stream that is cut into
// sequences of seq_len tokens. Positions reset at each document start, and a document cut by a
// sequence boundary continues in the next sequence from position 0 again, so every sequence is a list
// of *segments* and attention never needs to cross one (the trainer masks across segments).
//
// File layout (kvdistill_format "packed_text", format_version 1):
//
//   /                      attributes
//     kvdistill_format     "packed_text"
//     format_version       1
//     tokenizer_sha256     sha256 of the model's tokenizer.json (checked against the model on reading)
//     model_id             the model directory's name, e.g. "SmolLM2-135M-Instruct"
//     seq_len              tokens per sequence (every sequence but a split's last has exactly this many)
//     separator_id         token appended to every document (the tokenizer's end-of-text), -1 if none
//     seed, val_fraction   the document-level train / val split: a document is in val iff
//                          split_hash(seed, its text) < val_fraction (see split_of below)
//     num_documents        documents ingested (both splits)
//     source_bytes         bytes of input read
//   /train, /val           one group per split, attributes num_sequences, num_tokens, num_documents
//     tokens       int32 [T]      token ids, sequence after sequence            chunked, deflate
//     seq_offsets  int64 [N+1]    CSR: sequence i is tokens[seq_offsets[i] : seq_offsets[i+1]]
//     seg_offsets  int64 [N+1]    CSR: the segments of sequence i are seg_*[seg_offsets[i] : seg_offsets[i+1]]
//     seg_starts   int32 [S]      first token of each segment, relative to its sequence (the first is 0)
//     seg_docs     int64 [S]      document index (input order, over both splits) of each segment; a
//                                 document cut by a sequence boundary has segments in both sequences
//
// Token j of sequence i, in its segment k (seg_starts[k] <= j < the next start, or the end), has
// position j - seg_starts[k]. Each document is tokenized as the model would tokenize it alone
// (AddSpecial::Yes: Llama-3 style tokenizers prepend their BOS) and followed by separator_id.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/h5.h"

namespace kvd {

class Tokenizer;

inline constexpr const char* kPackedTextFormat = "packed_text";
inline constexpr int64_t kPackedTextVersion = 1;

enum class Split { Train, Val };
const char* split_name(Split s);

// Which split a document goes to: a hash of (seed, text), so identical documents always land in the same
// split (no train / val leakage through duplicates) and the decision needs no global view of the corpus.
Split split_of(uint64_t seed, const std::string& text, double val_fraction);

// Settings stored with a packed_text file.
struct PackedTextInfo {
  h5::Stamp stamp;
  int64_t seq_len = 0;
  int32_t separator_id = -1;
  uint64_t seed = 0;
  double val_fraction = 0;
  int64_t num_documents = 0;
  int64_t source_bytes = 0;
};

// Writes one split: documents in, fixed-length sequences out, flushed to HDF5 one chunk at a time
// (memory is O(chunk), whatever the number of documents).
class PackedSplitWriter {
 public:
  PackedSplitWriter(h5::File& file, Split split, int64_t seq_len, const h5::DatasetOptions& tokens_opt);
  // Appends a document's tokens (separator included). `doc_index` identifies it in seg_docs.
  void add_document(const std::vector<int32_t>& ids, int64_t doc_index);
  // Closes the last (possibly shorter) sequence, writes what is buffered and the group's attributes.
  void finish();

  int64_t num_sequences() const { return seq_offsets_.size() - 1; }
  int64_t num_tokens() const { return tokens_.size(); }
  int64_t num_documents() const { return num_docs_; }

 private:
  h5::Group group_;
  int64_t seq_len_;
  h5::Appender<int32_t> tokens_, seg_starts_;
  h5::Appender<int64_t> seq_offsets_, seg_offsets_, seg_docs_;
  int64_t num_docs_ = 0;
  int64_t in_seq_ = 0;  // tokens in the sequence being filled
  bool finished_ = false;
};

// One packed sequence as the trainer sees it.
struct PackedSequence {
  int64_t index = -1;               // sequence index in its split
  std::vector<int32_t> tokens;      // (L) token ids, L <= seq_len
  std::vector<int32_t> positions;   // (L) position within its segment; 0 at each segment start
  std::vector<int32_t> segments;    // (L) segment number within the sequence (0, 0, ..., 1, 1, ...)
  std::vector<int64_t> documents;   // (n_segments) document index of each segment
};

// Random access to one split. Cheap to copy; safe to use from several threads (reads take the HDF5
// lock). The CSR offsets are held in memory (16 bytes per sequence); tokens are read on demand.
class PackedSplitReader {
 public:
  int64_t size() const { return static_cast<int64_t>(seq_offsets_.size()) - 1; }
  int64_t num_tokens() const { return seq_offsets_.empty() ? 0 : seq_offsets_.back(); }
  int64_t seq_len() const { return seq_len_; }
  Split split() const { return split_; }
  // Sequence i (0 <= i < size()).
  PackedSequence get(int64_t i) const;
  // Length of sequence i, without reading it.
  int64_t length(int64_t i) const;

 private:
  friend class PackedTextReader;
  Split split_ = Split::Train;
  int64_t seq_len_ = 0;
  std::string file_;
  h5::Dataset tokens_;
  std::vector<int64_t> seq_offsets_, seg_offsets_, seg_docs_;
  std::vector<int32_t> seg_starts_;
};

// Opens a packed_text file, checking every root attribute and the CSR structure.
class PackedTextReader {
 public:
  // Checks format and version only.
  static PackedTextReader open(const std::string& path);
  // Also checks that the file was tokenized by `tokenizer` (the model the caller is about to use).
  static PackedTextReader open(const std::string& path, const Tokenizer& tokenizer);

  const PackedTextInfo& info() const { return info_; }
  const std::string& path() const { return path_; }
  PackedSplitReader split(Split s) const { return s == Split::Train ? train_ : val_; }

 private:
  static PackedTextReader open_impl(const std::string& path, const Tokenizer* tokenizer);
  std::string path_;
  h5::File file_;
  PackedTextInfo info_;
  PackedSplitReader train_, val_;
};

}  // namespace kvd
