// Byte-level BPE tokenizer loaded from a Hugging Face tokenizers file (tokenizer.json).
//
// Reproduces HF tokenizers (0.22) ids for the pipelines that byte-level BPE models use (GPT-2, SmolLM2,
// Llama-3, Qwen2/2.5/3):
//   added tokens (matched in the raw text) -> normalizer (null | NFC | Sequence)
//   -> normalized added tokens -> pre-tokenizers (ByteLevel | Split | Digits | Sequence)
//   -> BPE (merges by rank, optional ignore_merges) -> post-processor (ByteLevel | TemplateProcessing |
//   Sequence, only with AddSpecial::Yes).
// Decoding: token strings -> decoder (ByteLevel, or null: joined with spaces) -> UTF-8 with invalid
// sequences replaced by U+FFFD (one per maximal invalid subpart, as Rust's from_utf8_lossy).
//
// Anything else in the file (another model type, normalizer, pre-tokenizer, decoder or post-processor,
// a field value that changes behaviour) is rejected when loading:
//   kvd::Error "<path>: unsupported pre_tokenizer type 'Metaspace'".
// A Tokenizer is immutable after loading, cheap to copy (shared state) and safe to use from several
// threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kvd {

// Whether encode() applies the post-processor's template (e.g. Llama-3 prepends <|begin_of_text|>).
enum class AddSpecial { No, Yes };
// Whether decode() drops special added tokens (<|im_end|>, <|begin_of_text|>, ...).
enum class SkipSpecial { No, Yes };

class Tokenizer {
 public:
  // Parses a tokenizer.json; `path` may also be a model directory holding one. Throws kvd::Error naming
  // the file for missing/unreadable files, malformed JSON and unsupported content.
  static Tokenizer from_file(const std::string& path);
  // Same, from the JSON text; `context` names it in error messages (and sha256() hashes `json`).
  static Tokenizer from_json(std::string_view json, const std::string& context);

  // Token ids of UTF-8 `text` (throws kvd::Error if `text` is not valid UTF-8). Special tokens written
  // in the text ("<|im_start|>") are recognized, as HF does by default.
  std::vector<int32_t> encode(std::string_view text, AddSpecial add = AddSpecial::No) const;
  // Text of `ids`; throws kvd::Error for an id that has no token.
  std::string decode(const std::vector<int32_t>& ids, SkipSpecial skip = SkipSpecial::No) const;

  // Id of a token string (added tokens first, then the model vocabulary), e.g. token_id("<|im_end|>").
  std::optional<int32_t> token_id(std::string_view token) const;
  // The token string of `id` as stored in the file (byte-level form for model tokens, e.g. "Ġthe").
  // Throws kvd::Error if `id` has no token.
  const std::string& token(int32_t id) const;
  // One past the largest id (model vocabulary plus added tokens), i.e. len(tokenizer) in HF.
  int32_t vocab_size() const;
  // True for added tokens marked "special" (false for out-of-range ids).
  bool is_special(int32_t id) const;
  // Lower-case hex SHA-256 of the file bytes (fingerprints datasets tokenized with this tokenizer).
  const std::string& sha256() const;
  // The path (or context) this tokenizer was loaded from.
  const std::string& path() const;

  struct Impl;  // implementation detail (tokenizer.cpp)

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
  friend class Detokenizer;
};

// Streaming decode for printing generated tokens as they come: push() returns the text completed by
// one more token. A token may end inside a UTF-8 sequence; those bytes are held until the sequence
// completes. The concatenation of every push() and the final flush() equals decode(all ids).
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer& tokenizer, SkipSpecial skip = SkipSpecial::No);
  // Newly completed UTF-8 text (possibly empty). Throws kvd::Error if `id` has no token.
  std::string push(int32_t id);
  // Whatever is still held (an incomplete UTF-8 sequence becomes U+FFFD); resets the stream.
  std::string flush();

 private:
  std::shared_ptr<const Tokenizer::Impl> impl_;
  SkipSpecial skip_;
  std::string pending_;  // bytes not yet returned: an incomplete (so far valid) UTF-8 sequence
  bool first_ = true;    // for decoders that join tokens with a separator
};

// Unicode Normalization Form C of valid UTF-8 text (the NFC normalizer of Qwen2 tokenizers). Uses
// Unicode 14 tables embedded in tokenizer.cpp.
std::string nfc_normalize(std::string_view utf8);

}  // namespace kvd
