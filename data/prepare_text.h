// `kvdistill prepare text`: text inputs -> a packed_text HDF5 file (layout in data/packed_text.h).
//
// The pipeline streams: the main thread reads documents (data/text_input.h), worker threads tokenize
// them, and the main thread takes the results back *in input order* (so the output is byte-identical
// for any number of threads), assigns each document to train or val, and appends it to that split's
// packer, which flushes compressed chunks to HDF5 as they fill. Memory is bounded by the documents in
// flight (a few times max_doc_bytes per thread) plus one chunk per dataset, independent of the input
// size.
//
// The output is written to "<out>.tmp.<pid>" and renamed over <out> only when complete; on any error
// the temporary is removed and nothing at <out> changes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/text_input.h"

namespace kvd {

// How progress is shown on stderr.
enum class Progress {
  Auto,   // a live line when stderr is a terminal, else one line every 10 s
  Lines,  // one line every 10 s
  Never,
};

struct PrepareTextOptions {
  std::string model_dir;            // model directory (tokenizer.json; tokenizer_config.json for chat)
  std::vector<std::string> inputs;  // files and directories
  std::string out;                  // the .h5 file to write
  int64_t seq_len = 2048;
  double val_fraction = 0.01;       // in [0, 1)
  uint64_t seed = 0;
  int threads = 0;                  // tokenizer threads; 0 = one per core, at most 8
  std::string separator = "auto";   // token appended to each document: "auto", "none" or a token string
  uint64_t max_doc_bytes = 1 << 20;
  InvalidUtf8 invalid_utf8 = InvalidUtf8::Fail;
  Progress progress = Progress::Auto;
  int64_t chunk = 1 << 16;          // token chunk (elements) of the HDF5 datasets
  int deflate = 4;                  // zlib level
};

struct PrepareTextStats {
  int64_t documents = 0;
  uint64_t bytes = 0;
  int64_t tokens[2] = {0, 0};     // per Split (train, val)
  int64_t sequences[2] = {0, 0};
  int64_t split_documents[2] = {0, 0};
  int32_t separator_id = -1;
  double seconds = 0;
};

PrepareTextStats prepare_text(const PrepareTextOptions& opt);

}  // namespace kvd
