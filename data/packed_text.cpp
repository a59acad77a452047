#include "data/packed_text.h"

#include <algorithm>

#include "common/error.h"
#include "data/random.h"
#include "models/tokenizer.h"

namespace kvd {

const char* split_name(Split s) { return s == Split::Train ? "train" : "val"; }

Split split_of(uint64_t seed, const std::string& text, double val_fraction) {
  if (val_fraction <= 0) return Split::Train;
  return unit_interval(hash_bytes(seed, text.data(), text.size())) < val_fraction ? Split::Val : Split::Train;
}

// ---- writer --------------------------------------------------------------------------------------

PackedSplitWriter::PackedSplitWriter(h5::File& file, Split split, int64_t seq_len, const h5::DatasetOptions& tokens_opt)
    : seq_len_(seq_len) {
  KVD_CHECK(seq_len > 0, "seq_len must be positive, got ", seq_len);
  group_ = file.create_group(split_name(split));
  h5::DatasetOptions index_opt = tokens_opt;
  index_opt.chunk = std::min<int64_t>(tokens_opt.chunk, 1 << 14);
  tokens_ = {group_.create_dataset("tokens", h5::DType::Int32, tokens_opt), tokens_opt.chunk};
  seq_offsets_ = {group_.create_dataset("seq_offsets", h5::DType::Int64, index_opt), index_opt.chunk};
  seg_offsets_ = {group_.create_dataset("seg_offsets", h5::DType::Int64, index_opt), index_opt.chunk};
  seg_starts_ = {group_.create_dataset("seg_starts", h5::DType::Int32, index_opt), index_opt.chunk};
  seg_docs_ = {group_.create_dataset("seg_docs", h5::DType::Int64, index_opt), index_opt.chunk};
  seq_offsets_.push(0);
  seg_offsets_.push(0);
}

void PackedSplitWriter::add_document(const std::vector<int32_t>& ids, int64_t doc_index) {
  KVD_CHECK(!finished_, "PackedSplitWriter: add_document after finish");
  if (ids.empty()) return;
  ++num_docs_;
  size_t i = 0;
  while (i < ids.size()) {
    if (in_seq_ == seq_len_) {  // the sequence is full: close it; the document goes on in the next one
      seq_offsets_.push(tokens_.size());
      seg_offsets_.push(seg_starts_.size());
      in_seq_ = 0;
    }
    seg_starts_.push(static_cast<int32_t>(in_seq_));
    seg_docs_.push(doc_index);
    const size_t take = std::min<size_t>(ids.size() - i, static_cast<size_t>(seq_len_ - in_seq_));
    tokens_.push(ids.data() + i, static_cast<int64_t>(take));
    in_seq_ += static_cast<int64_t>(take);
    i += take;
  }
}

void PackedSplitWriter::finish() {
  if (finished_) return;
  finished_ = true;
  if (in_seq_ > 0) {
    seq_offsets_.push(tokens_.size());
    seg_offsets_.push(seg_starts_.size());
    in_seq_ = 0;
  }
  tokens_.flush();
  seq_offsets_.flush();
  seg_offsets_.flush();
  seg_starts_.flush();
  seg_docs_.flush();
  group_.set_attr("num_sequences", num_sequences());
  group_.set_attr("num_tokens", num_tokens());
  group_.set_attr("num_documents", num_docs_);
}

// ---- reader --------------------------------------------------------------------------------------

namespace {

// Checks that `off` is a CSR index over `n` elements: off[0] = 0, non-decreasing, off.back() = n.
void check_csr(const std::vector<int64_t>& off, int64_t n, const std::string& where) {
  KVD_CHECK(!off.empty() && off.front() == 0 && off.back() == n, where,
            ": not a valid CSR index (must start at 0 and end at ", n, "); the file is corrupt");
  for (size_t i = 1; i < off.size(); ++i)
    KVD_CHECK(off[i] >= off[i - 1], where, ": offsets decrease at ", i, "; the file is corrupt");
}

h5::Dataset open_typed(const h5::Group& g, const std::string& name, h5::DType t) {
  h5::Dataset d = g.open_dataset(name);
  KVD_CHECK(d.dtype() == t, g.file_path(), ": ", d.name(), ": expected ", h5::dtype_name(t), " elements, found ",
            h5::dtype_name(d.dtype()));
  return d;
}

}  // namespace

int64_t PackedSplitReader::length(int64_t i) const {
  KVD_CHECK(i >= 0 && i < size(), file_, ": /", split_name(split_), ": sequence ", i, " out of range [0, ", size(), ")");
  return seq_offsets_[static_cast<size_t>(i) + 1] - seq_offsets_[static_cast<size_t>(i)];
}

PackedSequence PackedSplitReader::get(int64_t i) const {
  const int64_t len = length(i);
  const size_t u = static_cast<size_t>(i);
  PackedSequence s;
  s.index = i;
  s.tokens = tokens_.read<int32_t>(seq_offsets_[u], len);
  s.positions.resize(static_cast<size_t>(len));
  s.segments.resize(static_cast<size_t>(len));
  const int64_t k0 = seg_offsets_[u], k1 = seg_offsets_[u + 1];
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t start = seg_starts_[static_cast<size_t>(k)];
    const int64_t end = k + 1 < k1 ? seg_starts_[static_cast<size_t>(k) + 1] : len;
    for (int64_t j = start; j < end; ++j) {
      s.positions[static_cast<size_t>(j)] = static_cast<int32_t>(j - start);
      s.segments[static_cast<size_t>(j)] = static_cast<int32_t>(k - k0);
    }
    s.documents.push_back(seg_docs_[static_cast<size_t>(k)]);
  }
  return s;
}

PackedTextReader PackedTextReader::open(const std::string& path) { return open_impl(path, nullptr); }

PackedTextReader PackedTextReader::open(const std::string& path, const Tokenizer& tokenizer) {
  return open_impl(path, &tokenizer);
}

PackedTextReader PackedTextReader::open_impl(const std::string& path, const Tokenizer* tokenizer) {
  PackedTextReader r;
  r.path_ = path;
  r.file_ = h5::File::open(path);
  PackedTextInfo& info = r.info_;
  info.stamp = h5::check_stamp(r.file_, kPackedTextFormat, kPackedTextVersion);
  if (tokenizer)
    h5::check_tokenizer(r.file_, info.stamp, tokenizer->sha256(), tokenizer->path(), "kvdistill prepare text");
  info.seq_len = r.file_.attr_int("seq_len");
  KVD_CHECK(info.seq_len > 0, path, ": seq_len ", info.seq_len, " must be positive; the file is corrupt");
  info.separator_id = static_cast<int32_t>(r.file_.attr_int("separator_id"));
  info.seed = static_cast<uint64_t>(r.file_.attr_int("seed"));
  info.val_fraction = r.file_.attr_double("val_fraction");
  info.num_documents = r.file_.attr_int("num_documents");
  info.source_bytes = r.file_.attr_int("source_bytes");

  for (Split s : {Split::Train, Split::Val}) {
    const h5::Group g = r.file_.open_group(split_name(s));
    PackedSplitReader& sr = s == Split::Train ? r.train_ : r.val_;
    sr.split_ = s;
    sr.seq_len_ = info.seq_len;
    sr.file_ = path;
    sr.tokens_ = open_typed(g, "tokens", h5::DType::Int32);
    sr.seq_offsets_ = open_typed(g, "seq_offsets", h5::DType::Int64).read_all<int64_t>();
    sr.seg_offsets_ = open_typed(g, "seg_offsets", h5::DType::Int64).read_all<int64_t>();
    sr.seg_starts_ = open_typed(g, "seg_starts", h5::DType::Int32).read_all<int32_t>();
    sr.seg_docs_ = open_typed(g, "seg_docs", h5::DType::Int64).read_all<int64_t>();
    const std::string where = path + ": /" + split_name(s);
    check_csr(sr.seq_offsets_, sr.tokens_.size(), where + "/seq_offsets");
    check_csr(sr.seg_offsets_, static_cast<int64_t>(sr.seg_starts_.size()), where + "/seg_offsets");
    KVD_CHECK(sr.seg_offsets_.size() == sr.seq_offsets_.size(), where,
              ": seg_offsets and seq_offsets differ in length; the file is corrupt");
    KVD_CHECK(sr.seg_docs_.size() == sr.seg_starts_.size(), where,
              ": seg_docs and seg_starts differ in length; the file is corrupt");
    for (int64_t i = 0; i < sr.size(); ++i) {
      const size_t u = static_cast<size_t>(i);
      const int64_t len = sr.seq_offsets_[u + 1] - sr.seq_offsets_[u];
      KVD_CHECK(len > 0 && len <= info.seq_len, where, ": sequence ", i, " has ", len, " tokens, outside [1, seq_len ",
                info.seq_len, "]; the file is corrupt");
      const int64_t k0 = sr.seg_offsets_[u], k1 = sr.seg_offsets_[u + 1];
      KVD_CHECK(k1 > k0 && sr.seg_starts_[static_cast<size_t>(k0)] == 0, where, ": sequence ", i,
                " does not start with a segment at 0; the file is corrupt");
      for (int64_t k = k0 + 1; k < k1; ++k) {
        const int32_t a = sr.seg_starts_[static_cast<size_t>(k) - 1], b = sr.seg_starts_[static_cast<size_t>(k)];
        KVD_CHECK(b > a && b < len, where, ": sequence ", i, " has segment starts out of order; the file is corrupt");
      }
    }
    const int64_t declared = g.attr_int("num_sequences");
    KVD_CHECK(declared == sr.size(), where, ": num_sequences ", declared, " but ", sr.size(),
              " sequences are stored; the file is corrupt");
  }
  return r;
}

}  // namespace kvd
