// Training readers (data/loader.h): sharding is disjoint and covers the epoch, shuffling is
// deterministic by (seed, epoch), a loader restored from a saved cursor yields exactly what an
// uninterrupted one yields, and batches are padded and segmented as documented.
// Also the responses file (data/responses.h; it links the same kvd_data): write / resume / repair round
// trips, and its completion-only packing for training, against hand-derived layouts.
#include "data/loader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include <nlohmann/json.hpp>

#include "data/data_fixtures.h"
#include "common/error.h"
#include "data/random.h"
#include "data/responses.h"

namespace kvd {
namespace {

using testing::ScratchDir;

// A packed file whose train split has `n` sequences of seq_len 8; sequence i starts with token 1000*i.
std::string make_packed(const ScratchDir& dir, int n) {
  const std::string path = dir / "p.h5";
  h5::File f = h5::File::create(path);
  h5::write_stamp(f, {kPackedTextFormat, kPackedTextVersion, "sha", "model"});
  for (auto [k, v] : std::vector<std::pair<const char*, int64_t>>{
           {"seq_len", 8}, {"separator_id", -1}, {"seed", 0}, {"num_documents", n}, {"source_bytes", 0}})
    f.set_attr(k, v);
  f.set_attr("val_fraction", 0.0);
  PackedSplitWriter train(f, Split::Train, 8, {64, 1, true});
  PackedSplitWriter val(f, Split::Val, 8, {64, 1, true});
  for (int i = 0; i < n; ++i) {
    // Two documents per sequence (5 + 3 tokens), except that the last sequence is 5 tokens long.
    std::vector<int32_t> a = {1000 * i, 1000 * i + 1, 1000 * i + 2, 1000 * i + 3, 1000 * i + 4};
    train.add_document(a, 2 * i);
    if (i + 1 < n) train.add_document({1000 * i + 5, 1000 * i + 6, 1000 * i + 7}, 2 * i + 1);
  }
  train.finish();
  val.finish();
  f.close();
  return path;
}

TEST(Sampler, ShardsAreDisjointAndCoverTheEpoch) {
  for (int64_t n : {1, 7, 64, 101}) {
    for (int64_t W : {1, 2, 3}) {
      for (int64_t B : {1, 4}) {
        if ((n + B - 1) / B < W) continue;  // some rank would get no batch at all
        std::vector<int64_t> seen;
        for (int64_t r = 0; r < W; ++r) {
          ShardedSampler s(n, {B, 11, r, W, Remainder::Uneven, Shuffle::Yes});
          for (int64_t k = 0; k < s.batches_per_epoch(); ++k) {
            const auto b = s.batch(2, k);
            EXPECT_LE(static_cast<int64_t>(b.size()), B);
            seen.insert(seen.end(), b.begin(), b.end());
          }
        }
        std::sort(seen.begin(), seen.end());
        std::vector<int64_t> all(static_cast<size_t>(n));
        std::iota(all.begin(), all.end(), int64_t{0});
        EXPECT_EQ(seen, all) << "n=" << n << " W=" << W << " B=" << B;
      }
    }
  }
}

TEST(Sampler, DropTailGivesEveryRankTheSameFullBatches) {
  const int64_t n = 103, B = 4, W = 3;
  std::set<int64_t> seen;
  for (int64_t r = 0; r < W; ++r) {
    ShardedSampler s(n, {B, 5, r, W, Remainder::DropTail, Shuffle::Yes});
    EXPECT_EQ(s.batches_per_epoch(), 8);  // floor(103 / 12)
    for (int64_t k = 0; k < s.batches_per_epoch(); ++k) {
      const auto b = s.batch(0, k);
      EXPECT_EQ(static_cast<int64_t>(b.size()), B);
      for (int64_t i : b) EXPECT_TRUE(seen.insert(i).second) << "index " << i << " on two ranks";
    }
  }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), 96);
  EXPECT_THROW(ShardedSampler(10, {4, 0, 0, 3, Remainder::DropTail, Shuffle::Yes}), Error);
}

TEST(Sampler, ShuffleIsDeterministicPerSeedAndEpoch) {
  ShardedSampler a(50, {5, 42, 0, 1, Remainder::DropTail, Shuffle::Yes});
  ShardedSampler b(50, {5, 42, 0, 1, Remainder::DropTail, Shuffle::Yes});
  ShardedSampler c(50, {5, 43, 0, 1, Remainder::DropTail, Shuffle::Yes});
  EXPECT_EQ(a.epoch_order(0), b.epoch_order(0));
  EXPECT_EQ(a.epoch_order(3), b.epoch_order(3));
  EXPECT_NE(a.epoch_order(0), a.epoch_order(1));
  EXPECT_NE(a.epoch_order(0), c.epoch_order(0));
  // The plan is a pure function of the seed: pinned so that a change of the shuffle is noticed.
  const auto o = a.epoch_order(0);
  EXPECT_EQ((std::vector<int64_t>{o[0], o[1], o[2], o[49]}), (std::vector<int64_t>{32, 45, 23, 2}));
  ShardedSampler in_order(6, {2, 42, 0, 1, Remainder::DropTail, Shuffle::No});
  EXPECT_EQ(in_order.epoch_order(5), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
}

TEST(Loader, BatchesArePaddedAndSegmented) {
  ScratchDir dir("ld_batch");
  const PackedTextReader r = PackedTextReader::open(make_packed(dir, 3));
  LoaderOptions opt;
  opt.sampler = {3, 0, 0, 1, Remainder::DropTail, Shuffle::No};
  opt.pad_id = -7;
  Loader l(r.split(Split::Train), opt);
  const Batch b = l.next();
  EXPECT_EQ(b.rows, 3);
  EXPECT_EQ(b.cols, 8);
  EXPECT_EQ(b.indices, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(b.lengths, (std::vector<int32_t>{8, 8, 5}));
  const std::vector<int32_t> row0(b.tokens.begin(), b.tokens.begin() + 8);
  EXPECT_EQ(row0, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  const std::vector<int32_t> pos0(b.positions.begin(), b.positions.begin() + 8);
  EXPECT_EQ(pos0, (std::vector<int32_t>{0, 1, 2, 3, 4, 0, 1, 2}));
  const std::vector<int32_t> seg2(b.segments.begin() + 16, b.segments.end());
  EXPECT_EQ(seg2, (std::vector<int32_t>{0, 0, 0, 0, 0, -1, -1, -1}));
  const std::vector<int32_t> tok2(b.tokens.begin() + 16, b.tokens.end());
  EXPECT_EQ(tok2, (std::vector<int32_t>{2000, 2001, 2002, 2003, 2004, -7, -7, -7}));
  EXPECT_EQ(l.cursor(), (Cursor{1, 0}));
}

// The first tokens of each row: enough to identify the batch.
std::vector<int32_t> fingerprint(const Batch& b) {
  std::vector<int32_t> f = {static_cast<int32_t>(b.epoch), static_cast<int32_t>(b.step)};
  for (int64_t r = 0; r < b.rows; ++r) f.push_back(b.tokens[static_cast<size_t>(r * b.cols)]);
  return f;
}

TEST(Loader, RestoredCursorYieldsExactlyTheUninterruptedBatches) {
  ScratchDir dir("ld_resume");
  const PackedTextReader r = PackedTextReader::open(make_packed(dir, 37));
  for (int64_t world : {1, 2}) {
    for (int64_t rank = 0; rank < world; ++rank) {
      for (int prefetch : {0, 3}) {
        LoaderOptions opt;
        opt.sampler = {4, 1234, rank, world, Remainder::DropTail, Shuffle::Yes};
        opt.prefetch = prefetch;
        const int total = 25;  // crosses epoch boundaries (9 or 4 steps per epoch)
        std::vector<std::vector<int32_t>> straight;
        {
          Loader l(r.split(Split::Train), opt);
          for (int i = 0; i < total; ++i) straight.push_back(fingerprint(l.next()));
        }
        for (int stop : {1, 4, 9, 13}) {
          std::string saved;
          {
            Loader l(r.split(Split::Train), opt);
            for (int i = 0; i < stop; ++i) EXPECT_EQ(fingerprint(l.next()), straight[static_cast<size_t>(i)]);
            saved = cursor_to_json(l.cursor(), l.sampler()).dump();
          }  // the "process" ends here, its prefetched batches are lost
          ShardedSampler s(r.split(Split::Train).size(), opt.sampler);
          const Cursor c = cursor_from_json(nlohmann::json::parse(saved), s, "ckpt");
          Loader resumed(r.split(Split::Train), opt, c);
          for (int i = stop; i < total; ++i)
            EXPECT_EQ(fingerprint(resumed.next()), straight[static_cast<size_t>(i)])
                << "world " << world << " rank " << rank << " prefetch " << prefetch << " stop " << stop << " i " << i;
        }
      }
    }
  }
}

TEST(Loader, CursorFromOtherSettingsIsRefused) {
  ShardedSampler s(100, {4, 1, 0, 2, Remainder::DropTail, Shuffle::Yes});
  nlohmann::json j = cursor_to_json({2, 3}, s);
  EXPECT_EQ(cursor_from_json(j, s, "ckpt"), (Cursor{2, 3}));
  ShardedSampler other(100, {4, 1, 0, 4, Remainder::DropTail, Shuffle::Yes});
  try {
    cursor_from_json(j, other, "run/ckpt.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run/ckpt.json: data cursor was saved with world_size = 2, but this run has 4"),
              std::string::npos)
        << e.what();
  }
  j.erase("seed");
  EXPECT_THROW(cursor_from_json(j, s, "ckpt"), Error);
}

TEST(Loader, RunsAcrossEpochsWithPrefetch) {
  ScratchDir dir("ld_err");
  const std::string path = make_packed(dir, 8);
  const PackedTextReader r = PackedTextReader::open(path);
  LoaderOptions opt;
  opt.sampler = {2, 0, 0, 1, Remainder::DropTail, Shuffle::Yes};
  opt.prefetch = 2;
  Loader l(r.split(Split::Train), opt);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(l.next().rows, 2);
}

// ---- responses files -----------------------------------------------------------------------------------

ResponsesSettings settings(int64_t n) {
  ResponsesSettings s;
  s.max_new_tokens = 4;
  s.batch = 2;
  s.prompts_sha256 = "abc";
  s.chat_template = "chatml";
  s.num_prompts = n;
  return s;
}

const h5::Stamp kStamp{kResponsesFormat, kResponsesVersion, "sha", "model"};

// Sample i: prompt of 2 + i % 3 tokens (100*i, 100*i+1, ...), response of 1 + i % 4 tokens (100*i+50, ...).
ResponseSample sample(int i) {
  ResponseSample s;
  for (int k = 0; k < 2 + i % 3; ++k) s.prompt.push_back(100 * i + k);
  for (int k = 0; k < 1 + i % 4; ++k) s.response.push_back(100 * i + 50 + k);
  s.stop = i % 2 ? ResponseStop::Eos : ResponseStop::MaxNewTokens;
  s.line = 2 * i + 1;
  s.id = i == 1 ? "" : "id-\xC3\xA9" + std::to_string(i);  // UTF-8 and an empty id
  return s;
}

void expect_sample(const ResponseSample& got, int i) {
  const ResponseSample want = sample(i);
  EXPECT_EQ(got.prompt, want.prompt) << i;
  EXPECT_EQ(got.response, want.response) << i;
  EXPECT_EQ(got.stop, want.stop) << i;
  EXPECT_EQ(got.line, want.line) << i;
  EXPECT_EQ(got.id, want.id) << i;
}

TEST(Responses, WriteResumeAndReadBack) {
  ScratchDir dir("resp_rt");
  const std::string path = dir / "r.h5.partial";
  {
    ResponsesWriter w = ResponsesWriter::open(path, kStamp, settings(5), Existing::Resume);
    w.append({sample(0), sample(1)});
    w.close();
  }
  // Not finished: a reader for training refuses it, an inspecting one sees 2 samples.
  EXPECT_THROW(ResponsesReader::open(path), Error);
  EXPECT_EQ(ResponsesReader::open(path, ResponsesReader::Complete::No).size(), 2);
  {
    ResponsesWriter w = ResponsesWriter::open(path, kStamp, settings(5), Existing::Resume);
    EXPECT_EQ(w.num_done(), 2);
    w.append({sample(2), sample(3)});
    w.append({sample(4)});
    w.close();
  }
  {
    const ResponsesReader r = ResponsesReader::open(path);
    ASSERT_EQ(r.size(), 5);
    for (int i = 0; i < 5; ++i) expect_sample(r.get(i), i);
    EXPECT_EQ(r.num_prompt_tokens(), 2 + 3 + 4 + 2 + 3);
    EXPECT_EQ(r.num_response_tokens(), 1 + 2 + 3 + 4 + 1);
    EXPECT_EQ(r.info().settings.max_new_tokens, 4);
    EXPECT_EQ(r.info().stamp.model_id, "model");
  }  // closed before the file is reopened for writing

  // Other settings refuse to resume, naming the setting; Overwrite starts over.
  ResponsesSettings other = settings(5);
  other.max_new_tokens = 9;
  try {
    ResponsesWriter::open(path, kStamp, other, Existing::Resume);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_new_tokens 4, this run asks for 9; use a new --out or pass --overwrite"),
              std::string::npos)
        << e.what();
  }
  ResponsesWriter w = ResponsesWriter::open(path, kStamp, other, Existing::Overwrite);
  EXPECT_EQ(w.num_done(), 0);
  w.close();
}

TEST(Responses, ResumeDropsAnInterruptedBatch) {
  ScratchDir dir("resp_cut");
  const std::string path = dir / "r.h5.partial";
  {
    ResponsesWriter w = ResponsesWriter::open(path, kStamp, settings(4), Existing::Resume);
    w.append({sample(0), sample(1)});
    w.close();
  }
  {  // A batch whose tokens and one offset were written when the process died (num_done not updated).
    h5::File f = h5::File::open(path, h5::Access::ReadWrite);
    f.open_dataset("prompt_tokens").append(std::vector<int32_t>{-1, -2, -3});
    f.open_dataset("response_tokens").append(std::vector<int32_t>{-4});
    f.open_dataset("prompt_offsets").append(std::vector<int64_t>{999});
    f.close();
  }
  {
    ResponsesWriter w = ResponsesWriter::open(path, kStamp, settings(4), Existing::Resume);
    EXPECT_EQ(w.num_done(), 2);
    w.append({sample(2), sample(3)});
    w.close();
  }
  const ResponsesReader r = ResponsesReader::open(path);
  ASSERT_EQ(r.size(), 4);
  for (int i = 0; i < 4; ++i) expect_sample(r.get(i), i);
  const h5::File f = h5::File::open(path);
  EXPECT_EQ(f.open_dataset("prompt_tokens").size(), 2 + 3 + 4 + 2);  // the garbage is gone
}

TEST(Responses, WrongFormatIsRefused) {
  ScratchDir dir("resp_fmt");
  const std::string packed = make_packed(dir, 2);
  try {
    ResponsesReader::open(packed);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kvdistill_format 'packed_text', expected 'responses'"), std::string::npos)
        << e.what();
  }
}

// Samples with hand-chosen lengths: (prompt, response) tokens.
std::string make_responses(const ScratchDir& dir, const std::vector<std::pair<int, int>>& lens) {
  const std::string path = dir / "r.h5";
  ResponsesWriter w = ResponsesWriter::open(path, kStamp, settings(static_cast<int64_t>(lens.size())), Existing::Overwrite);
  std::vector<ResponseSample> all;
  for (size_t i = 0; i < lens.size(); ++i) {
    ResponseSample s;
    for (int k = 0; k < lens[i].first; ++k) s.prompt.push_back(static_cast<int32_t>(1000 * i + k));
    for (int k = 0; k < lens[i].second; ++k) s.response.push_back(static_cast<int32_t>(1000 * i + 500 + k));
    all.push_back(s);
  }
  w.append(all);
  w.close();
  return path;
}

TEST(Responses, PackingIsCompletionOnly) {
  ScratchDir dir("resp_pack");
  // seq_len 10: samples 0 (3+2) and 1 (2+3) share sequence 0; 2 (4+4) does not fit after them: sequence 1;
  // 3 (9+5) is cut to 10 tokens (9 prompt + 1 response): sequence 2; 4 (10+1) leaves no room: skipped;
  // 5 (1+1) goes into sequence 3; 6 (2+0) has no response: skipped.
  const std::string path = make_responses(dir, {{3, 2}, {2, 3}, {4, 4}, {9, 5}, {10, 1}, {1, 1}, {2, 0}});
  const ResponsesSplit s(ResponsesReader::open(path), Split::Train, 10, 0, 0.0);
  ASSERT_EQ(s.size(), 4);
  EXPECT_EQ(s.seq_len(), 10);
  EXPECT_EQ(s.skipped(), 2);
  EXPECT_EQ(s.truncated(), 1);
  std::vector<uint8_t> t;
  PackedSequence q = s.get(0, t);
  EXPECT_EQ(q.tokens, (std::vector<int32_t>{0, 1, 2, 500, 501, 1000, 1001, 1500, 1501, 1502}));
  EXPECT_EQ(q.positions, (std::vector<int32_t>{0, 1, 2, 3, 4, 0, 1, 2, 3, 4}));
  EXPECT_EQ(q.segments, (std::vector<int32_t>{0, 0, 0, 0, 0, 1, 1, 1, 1, 1}));
  EXPECT_EQ(t, (std::vector<uint8_t>{0, 0, 0, 1, 1, 0, 0, 1, 1, 1}));
  EXPECT_EQ(q.documents, (std::vector<int64_t>{0, 1}));
  q = s.get(2, t);
  EXPECT_EQ(q.tokens.size(), 10u);
  EXPECT_EQ(q.tokens.back(), 3500);
  EXPECT_EQ(t, (std::vector<uint8_t>{0, 0, 0, 0, 0, 0, 0, 0, 0, 1}));
  q = s.get(3, t);
  EXPECT_EQ(q.tokens, (std::vector<int32_t>{5000, 5500}));
  EXPECT_EQ(q.documents, (std::vector<int64_t>{5}));

  // Through the loader: targets follow the source, 0 on padding.
  LoaderOptions opt;
  opt.sampler = {4, 0, 0, 1, Remainder::DropTail, Shuffle::No};
  Loader l(std::make_shared<ResponsesSplit>(s), opt);
  const Batch b = l.next();
  ASSERT_EQ(b.targets.size(), 40u);
  EXPECT_EQ(std::vector<uint8_t>(b.targets.begin() + 30, b.targets.end()),
            (std::vector<uint8_t>{0, 1, 0, 0, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(std::vector<int32_t>(b.segments.begin() + 30, b.segments.begin() + 33), (std::vector<int32_t>{0, 0, -1}));
  // A packed_text batch marks every real token as a target.
  const PackedTextReader p = PackedTextReader::open(make_packed(dir, 2));
  Loader lp(p.split(Split::Train), LoaderOptions{{2, 0, 0, 1, Remainder::DropTail, Shuffle::No}, 0, 0});
  const Batch bp = lp.next();
  EXPECT_EQ(std::vector<uint8_t>(bp.targets.begin() + 8, bp.targets.end()),
            (std::vector<uint8_t>{1, 1, 1, 1, 1, 0, 0, 0}));
}

TEST(Responses, TrainValSplitIsByPromptHashAndShardsStayDisjoint) {
  ScratchDir dir("resp_split");
  std::vector<std::pair<int, int>> lens;
  for (int i = 0; i < 60; ++i) lens.push_back({1 + i % 5, 1 + i % 3});
  const std::string path = make_responses(dir, lens);
  const ResponsesReader r = ResponsesReader::open(path);
  const ResponsesSplit tr(r, Split::Train, 4, 9, 0.3), va(r, Split::Val, 4, 9, 0.3);
  // Independent reference: hash_bytes over the little-endian bytes of the prompt ids, written out here.
  std::vector<int64_t> want_val;
  for (int i = 0; i < 60; ++i) {
    if (1 + i % 5 + 1 > 4) continue;  // skipped: no room for a response token in 4
    std::string bytes;
    for (int k = 0; k < 1 + i % 5; ++k) {
      const int32_t v = 1000 * i + k;
      bytes.append(reinterpret_cast<const char*>(&v), 4);  // x86 / ARM: little-endian
    }
    if (unit_interval(hash_bytes(9, bytes.data(), bytes.size())) < 0.3) want_val.push_back(i);
  }
  ASSERT_GT(want_val.size(), 5u);
  ASSERT_LT(want_val.size(), 40u);
  std::vector<int64_t> got_val, got_train;
  std::vector<uint8_t> t;
  for (int64_t i = 0; i < va.size(); ++i)
    for (int64_t d : va.get(i, t).documents) got_val.push_back(d);
  for (int64_t i = 0; i < tr.size(); ++i)
    for (int64_t d : tr.get(i, t).documents) got_train.push_back(d);
  EXPECT_EQ(got_val, want_val);
  EXPECT_EQ(static_cast<int64_t>(got_val.size() + got_train.size()), 60 - tr.skipped());
  // Two ranks read disjoint sequences.
  std::set<int64_t> seen;
  for (int64_t rank : {0, 1}) {
    LoaderOptions opt;
    opt.sampler = {2, 3, rank, 2, Remainder::DropTail, Shuffle::Yes};
    opt.prefetch = 1;
    Loader l(std::make_shared<ResponsesSplit>(tr), opt);
    for (int64_t k = 0; k < l.batches_per_epoch(); ++k)
      for (int64_t i : l.next().indices) EXPECT_TRUE(seen.insert(i).second) << i;
  }
}

}  // namespace
}  // namespace kvd
