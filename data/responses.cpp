#include "data/responses.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "common/error.h"
#include "data/random.h"
#include "models/tokenizer.h"

namespace kvd {

namespace fs = std::filesystem;

Split split_of_prompt(uint64_t seed, const std::vector<int32_t>& prompt, double val_fraction) {
  if (val_fraction <= 0) return Split::Train;
  std::string bytes;
  bytes.reserve(prompt.size() * 4);
  for (int32_t t : prompt) {
    const uint32_t u = static_cast<uint32_t>(t);
    for (int k = 0; k < 4; ++k) bytes.push_back(static_cast<char>((u >> (8 * k)) & 0xFF));  // little-endian
  }
  return unit_interval(hash_bytes(seed, bytes.data(), bytes.size())) < val_fraction ? Split::Val : Split::Train;
}

namespace {

h5::DatasetOptions tokens_opt() { return {1 << 16, 4, true}; }
h5::DatasetOptions index_opt() { return {1 << 12, 4, true}; }

h5::Dataset open_typed(const h5::Group& g, const std::string& name, h5::DType t) {
  h5::Dataset d = g.open_dataset(name);
  KVD_CHECK(d.dtype() == t, g.file_path(), ": ", d.name(), ": expected ", h5::dtype_name(t), " elements, found ",
            h5::dtype_name(d.dtype()));
  return d;
}

void check_csr(const std::vector<int64_t>& off, int64_t n, const std::string& where) {
  KVD_CHECK(!off.empty() && off.front() == 0 && off.back() == n, where,
            ": not a valid CSR index (must start at 0 and end at ", n, "); the file is corrupt");
  for (size_t i = 1; i < off.size(); ++i)
    KVD_CHECK(off[i] >= off[i - 1], where, ": offsets decrease at ", i, "; the file is corrupt");
}

void write_settings(h5::File& f, const ResponsesSettings& s) {
  f.set_attr("max_new_tokens", s.max_new_tokens);
  f.set_attr("batch", s.batch);
  f.set_attr("sampling", s.sampling);
  f.set_attr("prompts_sha256", s.prompts_sha256);
  f.set_attr("chat_template", s.chat_template);
  f.set_attr("num_prompts", s.num_prompts);
}

ResponsesInfo read_info(const h5::File& f) {
  ResponsesInfo i;
  i.stamp = h5::check_stamp(f, kResponsesFormat, kResponsesVersion);
  i.settings.max_new_tokens = f.attr_int("max_new_tokens");
  i.settings.batch = f.attr_int("batch");
  i.settings.sampling = f.attr_string("sampling");
  i.settings.prompts_sha256 = f.attr_string("prompts_sha256");
  i.settings.chat_template = f.attr_string("chat_template");
  i.settings.num_prompts = f.attr_int("num_prompts");
  i.num_done = f.attr_int("num_done");
  KVD_CHECK(i.num_done >= 0 && i.num_done <= i.settings.num_prompts, f.file_path(), ": num_done ", i.num_done,
            " is outside [0, num_prompts ", i.settings.num_prompts, "]; the file is corrupt");
  return i;
}

const char* kDatasets[] = {"prompt_tokens", "prompt_offsets", "response_tokens", "response_offsets",
                           "stop_reason",   "prompt_lines",   "id_bytes",        "id_offsets"};

}  // namespace

void check_same_settings(const std::string& file, const ResponsesInfo& have, const h5::Stamp& stamp,
                         const ResponsesSettings& want) {
  auto same = [&](const char* key, const auto& a, const auto& b) {
    KVD_CHECK(a == b, file, ": was made with ", key, " ", a, ", this run asks for ", b,
              "; use a new --out or pass --overwrite");
  };
  same("model_id", have.stamp.model_id, stamp.model_id);
  same("tokenizer_sha256", have.stamp.tokenizer_sha256, stamp.tokenizer_sha256);
  same("prompts_sha256 (another prompts file)", have.settings.prompts_sha256, want.prompts_sha256);
  same("max_new_tokens", have.settings.max_new_tokens, want.max_new_tokens);
  same("batch", have.settings.batch, want.batch);
  same("sampling", have.settings.sampling, want.sampling);
  same("chat_template", have.settings.chat_template, want.chat_template);
  same("num_prompts", have.settings.num_prompts, want.num_prompts);
}

// ---- writer --------------------------------------------------------------------------------------

ResponsesWriter ResponsesWriter::create(const std::string& path, const h5::Stamp& stamp, const ResponsesSettings& s) {
  ResponsesWriter w;
  w.file_ = h5::File::create(path);
  h5::write_stamp(w.file_, stamp);
  write_settings(w.file_, s);
  w.file_.set_attr("num_done", int64_t{0});
  w.prompt_tokens_ = w.file_.create_dataset("prompt_tokens", h5::DType::Int32, tokens_opt());
  w.prompt_offsets_ = w.file_.create_dataset("prompt_offsets", h5::DType::Int64, index_opt());
  w.response_tokens_ = w.file_.create_dataset("response_tokens", h5::DType::Int32, tokens_opt());
  w.response_offsets_ = w.file_.create_dataset("response_offsets", h5::DType::Int64, index_opt());
  w.stop_ = w.file_.create_dataset("stop_reason", h5::DType::Int32, index_opt());
  w.lines_ = w.file_.create_dataset("prompt_lines", h5::DType::Int64, index_opt());
  w.id_bytes_ = w.file_.create_dataset("id_bytes", h5::DType::Int32, index_opt());
  w.id_offsets_ = w.file_.create_dataset("id_offsets", h5::DType::Int64, index_opt());
  const int64_t zero = 0;
  w.prompt_offsets_.append(&zero, 1);
  w.response_offsets_.append(&zero, 1);
  w.id_offsets_.append(&zero, 1);
  w.file_.flush();
  return w;
}

ResponsesWriter ResponsesWriter::open(const std::string& partial_path, const h5::Stamp& stamp,
                                      const ResponsesSettings& s, Existing existing) {
  std::error_code ec;
  if (existing == Existing::Overwrite || !fs::exists(partial_path, ec)) return create(partial_path, stamp, s);

  // Resume: the settings must match, and the valid part is num_done samples.
  std::vector<ResponseSample> kept;
  bool consistent = true;
  {
    h5::File f;
    try {
      f = h5::File::open(partial_path, h5::Access::ReadWrite);
    } catch (const Error& e) {
      KVD_FAIL(partial_path, ": cannot resume this interrupted run (", e.what(), "); pass --overwrite to start over");
    }
    const ResponsesInfo have = read_info(f);
    check_same_settings(partial_path, have, stamp, s);
    const int64_t n = have.num_done;
    for (const char* name : kDatasets) {
      const int64_t size = f.open_dataset(name).size();
      const std::string ns = name;
      const bool offsets = ns.size() > 8 && ns.compare(ns.size() - 8, 8, "_offsets") == 0;
      if (offsets && size != n + 1) consistent = false;
      if ((ns == "stop_reason" || ns == "prompt_lines") && size != n) consistent = false;
    }
    if (consistent) {
      ResponsesWriter w;
      w.file_ = f;
      w.prompt_tokens_ = open_typed(f, "prompt_tokens", h5::DType::Int32);
      w.prompt_offsets_ = open_typed(f, "prompt_offsets", h5::DType::Int64);
      w.response_tokens_ = open_typed(f, "response_tokens", h5::DType::Int32);
      w.response_offsets_ = open_typed(f, "response_offsets", h5::DType::Int64);
      w.stop_ = open_typed(f, "stop_reason", h5::DType::Int32);
      w.lines_ = open_typed(f, "prompt_lines", h5::DType::Int64);
      w.id_bytes_ = open_typed(f, "id_bytes", h5::DType::Int32);
      w.id_offsets_ = open_typed(f, "id_offsets", h5::DType::Int64);
      w.num_done_ = n;
      w.prompt_end_ = w.prompt_offsets_.read<int64_t>(n, 1)[0];
      w.response_end_ = w.response_offsets_.read<int64_t>(n, 1)[0];
      w.id_end_ = w.id_offsets_.read<int64_t>(n, 1)[0];
      consistent = w.prompt_end_ <= w.prompt_tokens_.size() && w.response_end_ <= w.response_tokens_.size() &&
                   w.id_end_ <= w.id_bytes_.size();
      // Tokens of an interrupted batch past the recorded ends: the next append would leave a gap.
      if (consistent && w.prompt_end_ == w.prompt_tokens_.size() && w.response_end_ == w.response_tokens_.size() &&
          w.id_end_ == w.id_bytes_.size())
        return w;
      consistent = false;
    }
    f.close();
    // An interrupted batch left trailing data: keep the first num_done samples (read through the reader's checks).
    const ResponsesReader r = ResponsesReader::open(partial_path, ResponsesReader::Complete::No);
    for (int64_t i = 0; i < r.size(); ++i) kept.push_back(r.get(i));
  }
  const std::string fresh = partial_path + ".rebuild." + std::to_string(::getpid());
  {
    ResponsesWriter w = create(fresh, stamp, s);
    w.append(kept);
    w.close();
  }
  fs::rename(fresh, partial_path, ec);
  KVD_CHECK(!ec, partial_path, ": cannot replace it with its repaired copy (", ec.message(), ")");
  ResponsesWriter w = open(partial_path, stamp, s, Existing::Resume);
  return w;
}

void ResponsesWriter::append(const std::vector<ResponseSample>& batch) {
  if (batch.empty()) return;
  std::vector<int32_t> pt, rt, ids;
  std::vector<int64_t> po, ro, io, lines;
  std::vector<int32_t> stop;
  for (const ResponseSample& s : batch) {
    pt.insert(pt.end(), s.prompt.begin(), s.prompt.end());
    rt.insert(rt.end(), s.response.begin(), s.response.end());
    for (unsigned char c : s.id) ids.push_back(c);
    po.push_back(prompt_end_ + static_cast<int64_t>(pt.size()));
    ro.push_back(response_end_ + static_cast<int64_t>(rt.size()));
    io.push_back(id_end_ + static_cast<int64_t>(ids.size()));
    stop.push_back(static_cast<int32_t>(s.stop));
    lines.push_back(s.line);
  }
  // Token data first, the offsets that make it visible after, num_done last.
  if (!pt.empty()) prompt_tokens_.append(pt);
  if (!rt.empty()) response_tokens_.append(rt);
  if (!ids.empty()) id_bytes_.append(ids);
  prompt_offsets_.append(po);
  response_offsets_.append(ro);
  id_offsets_.append(io);
  stop_.append(stop);
  lines_.append(lines);
  prompt_end_ = po.back();
  response_end_ = ro.back();
  id_end_ = io.back();
  num_done_ += static_cast<int64_t>(batch.size());
  file_.set_attr("num_done", num_done_);
  file_.flush();
}

void ResponsesWriter::close() { file_.close(); }

// ---- reader --------------------------------------------------------------------------------------

ResponsesReader ResponsesReader::open(const std::string& path, Complete complete) {
  return open_impl(path, nullptr, complete);
}

ResponsesReader ResponsesReader::open(const std::string& path, const Tokenizer& tokenizer, Complete complete) {
  return open_impl(path, &tokenizer, complete);
}

ResponsesReader ResponsesReader::open_impl(const std::string& path, const Tokenizer* tokenizer, Complete complete) {
  ResponsesReader r;
  r.path_ = path;
  r.file_ = h5::File::open(path);
  r.info_ = read_info(r.file_);
  if (tokenizer)
    h5::check_tokenizer(r.file_, r.info_.stamp, tokenizer->sha256(), tokenizer->path(), "kvdistill prepare responses");
  const int64_t n = r.info_.num_done;
  if (complete == Complete::Yes)
    KVD_CHECK(n == r.info_.settings.num_prompts, path, ": holds ", n, " of ", r.info_.settings.num_prompts,
              " responses (an unfinished run); finish it by re-running `kvdistill prepare responses`");
  r.prompt_tokens_ = open_typed(r.file_, "prompt_tokens", h5::DType::Int32);
  r.response_tokens_ = open_typed(r.file_, "response_tokens", h5::DType::Int32);
  r.id_bytes_ = open_typed(r.file_, "id_bytes", h5::DType::Int32);
  auto prefix = [&](const char* name, h5::DType t, int64_t count) {
    const h5::Dataset d = open_typed(r.file_, name, t);
    KVD_CHECK(d.size() >= count, path, ": /", name, " has ", d.size(), " elements, fewer than the ", count,
              " that num_done ", n, " needs; the file is corrupt");
    return d;
  };
  r.prompt_off_ = prefix("prompt_offsets", h5::DType::Int64, n + 1).read<int64_t>(0, n + 1);
  r.response_off_ = prefix("response_offsets", h5::DType::Int64, n + 1).read<int64_t>(0, n + 1);
  r.id_off_ = prefix("id_offsets", h5::DType::Int64, n + 1).read<int64_t>(0, n + 1);
  r.lines_ = prefix("prompt_lines", h5::DType::Int64, n).read<int64_t>(0, n);
  r.stop_ = prefix("stop_reason", h5::DType::Int32, n).read<int32_t>(0, n);
  // A complete file holds exactly its samples; an interrupted one may hold a partly written batch past them.
  auto csr = [&](const std::vector<int64_t>& off, const h5::Dataset& data, const char* name) {
    KVD_CHECK(off.back() <= data.size() && (complete == Complete::No || off.back() == data.size()), path, ": /", name,
              " does not end where its offsets say (", off.back(), " of ", data.size(), "); the file is corrupt");
    check_csr(off, off.back(), path + ": /" + name);
  };
  csr(r.prompt_off_, r.prompt_tokens_, "prompt_offsets");
  csr(r.response_off_, r.response_tokens_, "response_offsets");
  csr(r.id_off_, r.id_bytes_, "id_offsets");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = r.stop_[static_cast<size_t>(i)];
    KVD_CHECK(s == 0 || s == 1, path, ": /stop_reason[", i, "] is ", s, ", not 0 (eos) or 1 (max_new_tokens); the file is corrupt");
    KVD_CHECK(r.prompt_length(i) > 0, path, ": sample ", i, " has an empty prompt; the file is corrupt");
  }
  return r;
}

int64_t ResponsesReader::prompt_length(int64_t i) const {
  KVD_CHECK(i >= 0 && i < size(), path_, ": sample ", i, " out of range [0, ", size(), ")");
  return prompt_off_[static_cast<size_t>(i) + 1] - prompt_off_[static_cast<size_t>(i)];
}

int64_t ResponsesReader::response_length(int64_t i) const {
  KVD_CHECK(i >= 0 && i < size(), path_, ": sample ", i, " out of range [0, ", size(), ")");
  return response_off_[static_cast<size_t>(i) + 1] - response_off_[static_cast<size_t>(i)];
}

void ResponsesReader::read_tokens(int64_t i, std::vector<int32_t>& prompt, std::vector<int32_t>& response,
                                  int64_t max_response) const {
  const size_t u = static_cast<size_t>(i);
  prompt = prompt_tokens_.read<int32_t>(prompt_off_[u], prompt_length(i));
  response = response_tokens_.read<int32_t>(response_off_[u], std::min(response_length(i), max_response));
}

ResponseSample ResponsesReader::get(int64_t i) const {
  ResponseSample s;
  const size_t u = static_cast<size_t>(i);
  read_tokens(i, s.prompt, s.response, response_length(i));
  s.stop = static_cast<ResponseStop>(stop_[u]);
  s.line = lines_[u];
  const std::vector<int32_t> id = id_bytes_.read<int32_t>(id_off_[u], id_off_[u + 1] - id_off_[u]);
  for (int32_t c : id) s.id.push_back(static_cast<char>(c));
  return s;
}

// ---- training view -------------------------------------------------------------------------------

ResponsesSplit::ResponsesSplit(ResponsesReader reader, Split split, int64_t seq_len, uint64_t seed, double val_fraction)
    : reader_(std::move(reader)), seq_len_(seq_len) {
  KVD_CHECK(seq_len >= 2, "seq_len ", seq_len, " must be at least 2");
  KVD_CHECK(val_fraction >= 0 && val_fraction < 1, "val_fraction ", val_fraction, " must be in [0, 1)");
  seq_samples_.push_back(0);
  int64_t in_seq = 0;  // tokens in the sequence being filled
  std::vector<int32_t> prompt, response;
  for (int64_t i = 0; i < reader_.size(); ++i) {
    const int64_t p = reader_.prompt_length(i), r = reader_.response_length(i);
    if (r == 0 || p + 1 > seq_len_) {  // no response token would fit (or there is none)
      ++skipped_;
      continue;
    }
    reader_.read_tokens(i, prompt, response, 0);
    if (split_of_prompt(seed, prompt, val_fraction) != split) continue;
    const int64_t len = std::min(p + r, seq_len_);
    truncated_ += p + r > seq_len_;
    if (in_seq + len > seq_len_) {
      seq_samples_.push_back(static_cast<int64_t>(samples_.size()));
      in_seq = 0;
    }
    samples_.push_back(i);
    in_seq += len;
  }
  if (in_seq > 0) seq_samples_.push_back(static_cast<int64_t>(samples_.size()));
}

PackedSequence ResponsesSplit::get(int64_t i, std::vector<uint8_t>& targets) const {
  KVD_CHECK(i >= 0 && i < size(), reader_.path(), ": packed sequence ", i, " out of range [0, ", size(), ")");
  PackedSequence s;
  s.index = i;
  targets.clear();
  std::vector<int32_t> prompt, response;
  const size_t u = static_cast<size_t>(i);
  for (int64_t k = seq_samples_[u]; k < seq_samples_[u + 1]; ++k) {
    const int64_t sample = samples_[static_cast<size_t>(k)];
    reader_.read_tokens(sample, prompt, response, seq_len_ - reader_.prompt_length(sample));
    const int32_t seg = static_cast<int32_t>(k - seq_samples_[u]);
    int32_t pos = 0;
    for (int32_t t : prompt) {
      s.tokens.push_back(t);
      s.positions.push_back(pos++);
      s.segments.push_back(seg);
      targets.push_back(0);
    }
    for (int32_t t : response) {
      s.tokens.push_back(t);
      s.positions.push_back(pos++);
      s.segments.push_back(seg);
      targets.push_back(1);
    }
    s.documents.push_back(sample);
  }
  return s;
}

}  // namespace kvd
