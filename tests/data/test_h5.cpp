// The HDF5 wrapper (data/h5.h): attribute and dataset round trips, range reads, the root stamp checks,
// and clear errors for missing, non-HDF5 and truncated files.
#include "data/h5.h"

#include <gtest/gtest.h>

#include <numeric>
#include <thread>

#include "data/data_fixtures.h"
#include "common/error.h"

namespace kvd {
namespace {

using testing::ScratchDir;

// Expects `f` to throw kvd::Error whose message contains every needle.
template <typename F>
std::string expect_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message spans lines: " << msg;
    return msg;
  }
  ADD_FAILURE() << "no kvd::Error thrown";
  return "";
}

TEST(H5, AttributesRoundTrip) {
  ScratchDir dir("h5_attrs");
  const std::string path = dir / "a.h5";
  {
    h5::File f = h5::File::create(path);
    f.set_attr("s", "héllo wörld");
    f.set_attr("empty", "");
    f.set_attr("i", int64_t{-1234567890123});
    f.set_attr("d", 0.125);
    h5::Group g = f.create_group("grp");
    g.set_attr("n", 7);
    g.set_attr("n", 8);  // replaces
    f.close();
  }
  h5::File f = h5::File::open(path);
  EXPECT_EQ(f.attr_string("s"), "héllo wörld");
  EXPECT_EQ(f.attr_string("empty"), "");
  EXPECT_EQ(f.attr_int("i"), -1234567890123);
  EXPECT_DOUBLE_EQ(f.attr_double("d"), 0.125);
  EXPECT_DOUBLE_EQ(f.attr_double("i"), -1234567890123.0);
  EXPECT_TRUE(f.has_attr("s"));
  EXPECT_FALSE(f.has_attr("nope"));
  const auto names = f.attr_names();
  EXPECT_EQ(names, (std::vector<std::string>{"d", "empty", "i", "s"}));
  EXPECT_TRUE(f.has("grp"));
  EXPECT_FALSE(f.has("other"));
  EXPECT_EQ(f.open_group("grp").attr_int("n"), 8);
  expect_error([&] { f.attr_int("s"); }, {"a.h5", "'s'", "not an integer"});
  expect_error([&] { f.attr_string("i"); }, {"'i'", "not a string"});
  expect_error([&] { f.attr_string("nope"); }, {"a.h5", "'nope'", "missing"});
  expect_error([&] { f.open_group("other"); }, {"a.h5", "/other", "missing"});
  expect_error([&] { f.open_dataset("grp"); }, {"a.h5", "/grp"});
}

TEST(H5, Int32AndInt64DatasetsAppendAndReadRanges) {
  ScratchDir dir("h5_ds");
  const std::string path = dir / "d.h5";
  std::vector<int32_t> a(100003);
  std::iota(a.begin(), a.end(), -50000);
  std::vector<int64_t> b = {0, int64_t{1} << 40, -(int64_t{1} << 50), 42};
  {
    h5::File f = h5::File::create(path);
    h5::Group g = f.create_group("g");
    h5::DatasetOptions opt;
    opt.chunk = 1000;  // many chunks, and appends that straddle them
    h5::Dataset da = g.create_dataset("a", h5::DType::Int32, opt);
    size_t at = 0;
    for (size_t n : {size_t{1}, size_t{999}, size_t{1}, size_t{50000}, size_t{0}}) {
      da.append(a.data() + at, static_cast<int64_t>(n));
      at += n;
    }
    da.append(a.data() + at, static_cast<int64_t>(a.size() - at));
    EXPECT_EQ(da.size(), static_cast<int64_t>(a.size()));
    h5::Dataset db = g.create_dataset("b", h5::DType::Int64, {16, 0, false});  // uncompressed
    db.append(b);
    expect_error([&] { db.append(a); }, {"/g/b", "int32", "int64"});
    h5::Appender<int32_t> app(g.create_dataset("c", h5::DType::Int32), 7);
    for (int i = 0; i < 20; ++i) app.push(i);
    EXPECT_EQ(app.size(), 20);
    app.flush();
    f.close();
  }
  h5::File f = h5::File::open(path);
  h5::Group g = f.open_group("g");
  h5::Dataset da = g.open_dataset("a");
  EXPECT_EQ(da.dtype(), h5::DType::Int32);
  EXPECT_EQ(da.read_all<int32_t>(), a);
  EXPECT_EQ(da.read<int32_t>(999, 3), (std::vector<int32_t>{a[999], a[1000], a[1001]}));
  EXPECT_EQ(da.read<int32_t>(a.size() - 1, 1), (std::vector<int32_t>{a.back()}));
  EXPECT_TRUE(da.read<int32_t>(5, 0).empty());
  expect_error([&] { da.read<int32_t>(static_cast<int64_t>(a.size()) - 1, 2); }, {"d.h5", "/g/a", "outside"});
  expect_error([&] { da.read<int64_t>(0, 1); }, {"/g/a", "int64", "int32"});
  h5::Dataset db = g.open_dataset("b");
  EXPECT_EQ(db.dtype(), h5::DType::Int64);
  EXPECT_EQ(db.read_all<int64_t>(), b);
  std::vector<int32_t> c(20);
  std::iota(c.begin(), c.end(), 0);
  EXPECT_EQ(g.open_dataset("c").read_all<int32_t>(), c);
}

TEST(H5, ConcurrentReadsFromThreads) {
  ScratchDir dir("h5_threads");
  const std::string path = dir / "t.h5";
  std::vector<int32_t> a(200000);
  std::iota(a.begin(), a.end(), 0);
  {
    h5::File f = h5::File::create(path);
    f.create_dataset("a", h5::DType::Int32, {4096, 4, true}).append(a);
    f.close();
  }
  h5::File f = h5::File::open(path);
  const h5::Dataset d = f.open_dataset("a");
  std::vector<std::thread> ts;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      bool good = true;
      for (int i = 0; i < 200; ++i) {
        const int64_t start = (t * 7919 + i * 104729) % 190000;
        const auto v = d.read<int32_t>(start, 1000);
        good = good && v.front() == start && v.back() == start + 999;
      }
      ok[t] = good;
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(ok, (std::vector<int>{1, 1, 1, 1}));
}

TEST(H5, StampChecks) {
  ScratchDir dir("h5_stamp");
  const std::string path = dir / "s.h5";
  {
    h5::File f = h5::File::create(path);
    h5::write_stamp(f, {"packed_text", 1, "abcdef0123456789abcdef", "SmolLM2-135M-Instruct"});
    f.close();
  }
  h5::File f = h5::File::open(path);
  const h5::Stamp s = h5::check_stamp(f, "packed_text", 1);
  EXPECT_EQ(s.format, "packed_text");
  EXPECT_EQ(s.version, 1);
  EXPECT_EQ(s.tokenizer_sha256, "abcdef0123456789abcdef");
  EXPECT_EQ(s.model_id, "SmolLM2-135M-Instruct");
  h5::check_tokenizer(f, s, "abcdef0123456789abcdef", "m/tokenizer.json", "kvdistill prepare text");
  expect_error([&] { h5::check_stamp(f, "packed_text", 2); },
               {"s.h5", "format_version 1, this kvdistill reads 2", "re-create"});
  expect_error([&] { h5::check_stamp(f, "responses", 1); }, {"s.h5", "kvdistill_format 'packed_text'", "'responses'"});
  expect_error([&] { h5::check_tokenizer(f, s, "ffff", "m/tokenizer.json", "kvdistill prepare text"); },
               {"s.h5", "tokenizer_sha256 abcdef012345...", "does not match m/tokenizer.json (ffff)",
                "re-run `kvdistill prepare text` with this model"});
  {
    h5::File g = h5::File::create(dir / "plain.h5");
    g.close();
  }
  expect_error([&] { h5::check_stamp(h5::File::open(dir / "plain.h5"), "packed_text", 1); },
               {"plain.h5", "not a kvdistill dataset"});
  {
    h5::File g = h5::File::create(dir / "newer.h5");
    h5::write_stamp(g, {"packed_text", 3, "x", "m"});
    g.close();
  }
  expect_error([&] { h5::check_stamp(h5::File::open(dir / "newer.h5"), "packed_text", 1); },
               {"newer.h5: format_version 3, this kvdistill reads 1; upgrade kvdistill"});
}

TEST(H5, BadFilesAreClearErrors) {
  ScratchDir dir("h5_bad");
  expect_error([&] { h5::File::open(dir / "missing.h5"); }, {"missing.h5", "no such file"});
  testing::write_text(dir / "text.h5", "this is not HDF5 at all\n");
  expect_error([&] { h5::File::open(dir / "text.h5"); }, {"text.h5", "not an HDF5 file"});
  testing::write_text(dir / "empty.h5", "");
  expect_error([&] { h5::File::open(dir / "empty.h5"); }, {"empty.h5", "not an HDF5 file"});
  // A real file cut in half.
  const std::string full = dir / "full.h5";
  {
    h5::File f = h5::File::create(full);
    std::vector<int32_t> a(300000);
    std::iota(a.begin(), a.end(), 0);
    f.create_dataset("a", h5::DType::Int32, {8192, 0, false}).append(a);
    f.close();
  }
  const auto size = std::filesystem::file_size(full);
  std::filesystem::copy_file(full, dir / "cut.h5");
  std::filesystem::resize_file(dir / "cut.h5", size / 2);
  expect_error([&] { h5::File::open(dir / "cut.h5").open_dataset("a").read_all<int32_t>(); }, {"cut.h5", "truncated"});
  expect_error([&] { h5::File::create(dir / "no/such/dir/x.h5"); }, {"x.h5", "cannot create"});
}

}  // namespace
}  // namespace kvd
