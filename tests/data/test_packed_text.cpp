// Packed text (data/packed_text.h, data/prepare_text.h): the packing of documents into sequences and
// segments, the reader's checks, and `prepare text` end to end on a tiny tokenizer: tokens equal the
// tokenizer's, the split is deterministic and by document, output is identical for any thread count,
// and a failure leaves no output behind.
#include "data/packed_text.h"

#include <gtest/gtest.h>

#include <map>
#include <set>

#include "data/data_fixtures.h"
#include "common/error.h"
#include "common/fs.h"
#include "data/prepare_text.h"
#include "models/tokenizer.h"

namespace kvd {
namespace {

using testing::ScratchDir;
using testing::write_text;

std::vector<int32_t> iota_ids(int32_t from, int n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = from + i;
  return v;
}

void write_stamped(h5::File& f, int64_t seq_len) {
  h5::write_stamp(f, {kPackedTextFormat, kPackedTextVersion, "sha", "model"});
  f.set_attr("seq_len", seq_len);
  f.set_attr("separator_id", int64_t{-1});
  f.set_attr("seed", int64_t{0});
  f.set_attr("val_fraction", 0.0);
  f.set_attr("num_documents", int64_t{0});
  f.set_attr("source_bytes", int64_t{0});
}

TEST(PackedText, DocumentsPackIntoSequencesOfSegments) {
  ScratchDir dir("pt_pack");
  const std::string path = dir / "p.h5";
  {
    h5::File f = h5::File::create(path);
    write_stamped(f, 5);
    PackedSplitWriter train(f, Split::Train, 5, {4, 1, true});
    PackedSplitWriter val(f, Split::Val, 5, {4, 1, true});
    train.add_document(iota_ids(100, 3), 0);  // seq 0: [100 101 102 | 200 201]
    train.add_document(iota_ids(200, 7), 1);  // seq 1: [202 203 204 205 206]
    train.add_document(iota_ids(300, 2), 2);  // seq 2: [300 301 | 400 401 402]
    train.add_document({}, 3);                // empty: ignored
    train.add_document(iota_ids(400, 5), 4);  // seq 3: [403 404 | 500]
    train.add_document(iota_ids(500, 1), 5);
    train.finish();
    val.add_document(iota_ids(900, 5), 6);  // exactly one full sequence
    val.finish();
    EXPECT_EQ(train.num_sequences(), 4);
    EXPECT_EQ(train.num_tokens(), 18);
    EXPECT_EQ(train.num_documents(), 5);
    f.close();
  }
  const PackedTextReader r = PackedTextReader::open(path);
  const PackedSplitReader tr = r.split(Split::Train);
  ASSERT_EQ(tr.size(), 4);
  EXPECT_EQ(tr.num_tokens(), 18);
  const PackedSequence s0 = tr.get(0), s1 = tr.get(1), s2 = tr.get(2), s3 = tr.get(3);
  EXPECT_EQ(s0.tokens, (std::vector<int32_t>{100, 101, 102, 200, 201}));
  EXPECT_EQ(s0.positions, (std::vector<int32_t>{0, 1, 2, 0, 1}));
  EXPECT_EQ(s0.segments, (std::vector<int32_t>{0, 0, 0, 1, 1}));
  EXPECT_EQ(s0.documents, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(s1.tokens, (std::vector<int32_t>{202, 203, 204, 205, 206}));
  EXPECT_EQ(s1.positions, (std::vector<int32_t>{0, 1, 2, 3, 4}));  // a continued document restarts at 0
  EXPECT_EQ(s1.documents, (std::vector<int64_t>{1}));
  EXPECT_EQ(s2.tokens, (std::vector<int32_t>{300, 301, 400, 401, 402}));
  EXPECT_EQ(s2.positions, (std::vector<int32_t>{0, 1, 0, 1, 2}));
  EXPECT_EQ(s2.documents, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(s3.tokens, (std::vector<int32_t>{403, 404, 500}));  // the tail is shorter
  EXPECT_EQ(s3.positions, (std::vector<int32_t>{0, 1, 0}));
  EXPECT_EQ(s3.segments, (std::vector<int32_t>{0, 0, 1}));
  EXPECT_EQ(s3.documents, (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(tr.length(3), 3);
  const PackedSplitReader va = r.split(Split::Val);
  ASSERT_EQ(va.size(), 1);
  EXPECT_EQ(va.get(0).tokens, iota_ids(900, 5));
  EXPECT_THROW(tr.get(4), Error);
}

TEST(PackedText, ReaderRejectsInconsistentFiles) {
  ScratchDir dir("pt_bad");
  const std::string path = dir / "bad.h5";
  {
    h5::File f = h5::File::create(path);
    write_stamped(f, 4);
    for (const char* s : {"train", "val"}) {
      h5::Group g = f.create_group(s);
      g.set_attr("num_sequences", int64_t{1});
      g.create_dataset("tokens", h5::DType::Int32).append(iota_ids(0, 4));
      g.create_dataset("seq_offsets", h5::DType::Int64).append(std::vector<int64_t>{0, 5});  // past the end
      g.create_dataset("seg_offsets", h5::DType::Int64).append(std::vector<int64_t>{0, 1});
      g.create_dataset("seg_starts", h5::DType::Int32).append(std::vector<int32_t>{0});
      g.create_dataset("seg_docs", h5::DType::Int64).append(std::vector<int64_t>{0});
    }
    f.close();
  }
  try {
    PackedTextReader::open(path);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.h5: /train/seq_offsets: not a valid CSR index"), std::string::npos)
        << e.what();
  }
}

struct Corpus {
  ScratchDir dir{"pt_corpus"};
  std::string model;
  std::vector<std::string> docs;  // in input order
  Corpus() {
    model = testing::write_tiny_model(dir / "model");
    // 60 documents of varied length over three kinds of input.
    for (int i = 0; i < 20; ++i) {
      std::string t;
      for (int k = 0; k <= i * 3; ++k) t += "the cat " + std::to_string(i) + " sat on the mat, then went in. ";
      write_text(dir / ("in/txt/doc" + std::to_string(100 + i) + ".txt"), t);
      docs.push_back(t);
    }
    std::string jsonl;
    for (int i = 0; i < 40; ++i) {
      const std::string t = "line " + std::to_string(i) + ": rest and wear " + std::string(static_cast<size_t>(i), 'w');
      jsonl += nlohmann::json{{"text", t}}.dump() + "\n";
      docs.push_back(t);
    }
    write_text(dir / "in/z.jsonl", jsonl);
  }
  PrepareTextOptions options(const std::string& out) const {
    PrepareTextOptions o;
    o.model_dir = model;
    o.inputs = {dir / "in"};
    o.out = out;
    o.seq_len = 64;
    o.val_fraction = 0.25;
    o.seed = 7;
    o.progress = Progress::Never;
    o.chunk = 100;
    return o;
  }
};

TEST(PrepareText, TokensSegmentsAndSplitMatchTheTokenizer) {
  Corpus c;
  const std::string out = c.dir / "out.h5";
  const PrepareTextStats st = prepare_text(c.options(out));
  EXPECT_EQ(st.documents, 60);
  const Tokenizer tok = Tokenizer::from_file(c.model);
  EXPECT_EQ(st.separator_id, 270);
  const PackedTextReader r = PackedTextReader::open(out, tok);
  EXPECT_EQ(r.info().seq_len, 64);
  EXPECT_EQ(r.info().num_documents, 60);
  EXPECT_EQ(r.info().stamp.model_id, "model");
  EXPECT_EQ(r.info().stamp.tokenizer_sha256, tok.sha256());

  // Reassemble every document from its segments; compare with the tokenizer and the split rule.
  std::map<int64_t, std::vector<int32_t>> got;
  std::map<int64_t, Split> where;
  for (Split s : {Split::Train, Split::Val}) {
    const PackedSplitReader sr = r.split(s);
    EXPECT_EQ(sr.num_tokens(), st.tokens[static_cast<int>(s)]);
    for (int64_t i = 0; i < sr.size(); ++i) {
      const PackedSequence q = sr.get(i);
      if (i + 1 < sr.size()) EXPECT_EQ(q.tokens.size(), 64u);
      for (size_t j = 0; j < q.tokens.size(); ++j) {
        const int64_t doc = q.documents[static_cast<size_t>(q.segments[j])];
        if (q.positions[j] == 0 && j > 0) EXPECT_NE(q.segments[j], q.segments[j - 1]);
        got[doc].push_back(q.tokens[j]);
        where[doc] = s;
      }
    }
  }
  ASSERT_EQ(got.size(), 60u);
  int n_val = 0;
  for (int64_t d = 0; d < 60; ++d) {
    std::vector<int32_t> want = tok.encode(c.docs[static_cast<size_t>(d)], AddSpecial::Yes);
    want.push_back(270);
    EXPECT_EQ(got[d], want) << "document " << d;
    EXPECT_EQ(where[d], split_of(7, c.docs[static_cast<size_t>(d)], 0.25)) << "document " << d;
    n_val += where[d] == Split::Val;
  }
  EXPECT_GT(n_val, 5);
  EXPECT_LT(n_val, 25);

  // A different tokenizer is refused.
  const std::string other = testing::write_tiny_model(c.dir / "other", " ");
  try {
    PackedTextReader::open(out, Tokenizer::from_file(other));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not match " + other + "/tokenizer.json"), std::string::npos) << e.what();
  }
}

TEST(PrepareText, OutputIsIdenticalForAnyThreadCountAndSeedChangesTheSplit) {
  Corpus c;
  PrepareTextOptions o = c.options(c.dir / "t1.h5");
  o.threads = 1;
  prepare_text(o);
  o.out = c.dir / "t3.h5";
  o.threads = 3;
  o.max_doc_bytes = 1 << 20;
  prepare_text(o);
  EXPECT_EQ(sha256_hex(read_file(c.dir / "t1.h5")), sha256_hex(read_file(c.dir / "t3.h5")));
  o.out = c.dir / "s8.h5";
  o.seed = 8;
  prepare_text(o);
  EXPECT_NE(PackedTextReader::open(c.dir / "s8.h5").split(Split::Val).num_tokens(),
            PackedTextReader::open(c.dir / "t1.h5").split(Split::Val).num_tokens());
}

TEST(PrepareText, FailureLeavesNoOutput) {
  Corpus c;
  write_text(c.dir / "in/zz_bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": oops}\n");
  const std::string out = c.dir / "out.h5";
  write_text(out, "previous content");
  try {
    prepare_text(c.options(out));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zz_bad.jsonl:2: malformed JSON"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(out), "previous content");
  for (const auto& e : std::filesystem::directory_iterator(c.dir.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}

}  // namespace
}  // namespace kvd
