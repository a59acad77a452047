#include "data/tasks.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "data/random.h"
#include "data/text_input.h"
#include "models/tokenizer.h"

namespace kvd {

namespace {

constexpr uint64_t kPoolSeed = 0x6B7664706F6F6Cull;  // fixed: the pool does not depend on the task seed

// Task sizes, chosen so that SmolLM2-135M-Instruct with a full cache scores >= 60% on each task at 2K and
// 4K tokens (docs/results/tasks-full-cache-smollm2.md).
constexpr int kMultiKeyNeedles = 2;    // niah_multikey: the asked key and 1 distractor key
constexpr int kMultiValueNeedles = 2;  // niah_multivalue: numbers for the one key (at most 4: ordinals)
constexpr int kMultiQueryNeedles = 2;  // niah_multiquery: keys asked about (at most 4: number_kinds())
constexpr int kVtChain = 2;            // vt: variables in the chain (1 hop)
constexpr int kVtChains = 1;           // vt: chains (the first is asked about, the others are distractors)
constexpr int kCweWords = 1;           // cwe: the common words asked for
constexpr int kFweWords = 1;           // fwe: the most frequent words asked for
constexpr int64_t kFweVocab = 2000;    // fwe: distinct words in the text (at most)

bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_lower(char c) { return c >= 'a' && c <= 'z'; }
bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == '\f' || c == '\v'; }

std::string collapse_ws(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  bool space = false;
  for (char c : s) {
    if (is_space(c)) {
      space = !out.empty();
    } else {
      if (space) out += ' ';
      space = false;
      out += c;
    }
  }
  return out;
}

// Markup-free prose: no reST / Markdown / dictionary markup characters, mostly letters, has a sentence.
bool is_prose(const std::string& p) {
  if (p.size() < 200 || p.size() > 3000) return false;
  size_t letters = 0, periods = 0;
  for (char c : p) {
    if (std::string_view("\\{}|`*=<>#_~^[]@$%").find(c) != std::string_view::npos) return false;
    if (static_cast<unsigned char>(c) >= 0x80) return false;  // ASCII prose only: keeps token counts stable
    letters += is_alpha(c);
    periods += c == '.';
  }
  return letters * 10 >= p.size() * 7 && periods >= 1;
}

std::vector<std::string> split_words(const std::string& p) {
  std::vector<std::string> w;
  size_t i = 0;
  while (i < p.size()) {
    const size_t j = std::min(p.find(' ', i), p.size());
    if (j > i) w.push_back(p.substr(i, j - i));
    i = j + 1;
  }
  return w;
}

std::string join(const std::vector<std::string>& v, const std::string& sep, size_t begin = 0,
                 size_t end = std::string::npos) {
  end = std::min(end, v.size());
  std::string s;
  for (size_t i = begin; i < end; ++i) {
    if (i > begin) s += sep;
    s += v[i];
  }
  return s;
}

size_t count_occurrences(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t p = hay.find(needle); p != std::string::npos; p = hay.find(needle, p + 1)) ++n;
  return n;
}

// Distinct draws from [0, n) (partial Fisher-Yates over a sparse map).
std::vector<size_t> sample_distinct(Rng& rng, size_t n, size_t k) {
  KVD_CHECK(k <= n, "cannot draw ", k, " distinct items from ", n);
  std::map<size_t, size_t> swapped;
  auto at = [&](size_t i) {
    auto it = swapped.find(i);
    return it == swapped.end() ? i : it->second;
  };
  std::vector<size_t> out;
  for (size_t i = 0; i < k; ++i) {
    const size_t j = i + static_cast<size_t>(rng.below(n - i));
    const size_t vi = at(i), vj = at(j);
    swapped[j] = vi;
    out.push_back(vj);
  }
  return out;
}

// A needle paragraph placed at a relative depth in [0, 1] of the haystack.
struct Needle {
  std::string text;
  double depth = 0;
};

// The haystack words of one sample: consecutive pool paragraphs from a random start.
struct Stream {
  std::vector<std::string> words;
  std::vector<size_t> para_start;  // index in words of each paragraph's first word
};

void extend_stream(Stream& s, const Haystack& hay, size_t& next_para, size_t exclude, size_t want_words) {
  const auto& paras = hay.paragraphs();
  size_t guard = 0;
  while (s.words.size() < want_words) {
    KVD_CHECK(guard++ <= paras.size(), "the corpus is too small for this length (", paras.size(),
              " paragraphs in all); add text to the corpus or use shorter lengths");
    const size_t p = next_para % paras.size();
    ++next_para;
    if (p == exclude) continue;
    s.para_start.push_back(s.words.size());
    for (std::string& w : split_words(paras[p])) s.words.push_back(std::move(w));
  }
}

// The first `w` haystack words (paragraph breaks kept) with the needles inserted between paragraphs at
// their depths; needles at the same place keep their order.
std::string render(const Stream& s, size_t w, const std::vector<Needle>& needles) {
  std::vector<std::string> paras;
  for (size_t k = 0; k < s.para_start.size() && s.para_start[k] < w; ++k) {
    const size_t end = k + 1 < s.para_start.size() ? std::min(s.para_start[k + 1], w) : std::min(s.words.size(), w);
    paras.push_back(join(s.words, " ", s.para_start[k], end));
  }
  const size_t n = paras.size();
  std::vector<std::vector<const Needle*>> at(n + 1);
  for (const Needle& nd : needles) {
    const size_t pos = std::min(n, static_cast<size_t>(std::llround(nd.depth * static_cast<double>(n))));
    at[pos].push_back(&nd);
  }
  std::string out;
  for (size_t k = 0; k <= n; ++k) {
    for (const Needle* nd : at[k]) out += (out.empty() ? "" : "\n\n") + nd->text;
    if (k < n) out += (out.empty() ? "" : "\n\n") + paras[k];
  }
  return out;
}

}  // namespace

// ---- Haystack --------------------------------------------------------------------------------------

const std::vector<std::string>& ruler_tasks() {
  static const std::vector<std::string> t = {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                             "vt",          "cwe",           "fwe",             "qa"};
  return t;
}

Haystack Haystack::from_inputs(const std::vector<std::string>& inputs, size_t max_paragraphs) {
  for (const std::string& in : inputs)
    KVD_CHECK(std::filesystem::exists(in), in, ": no such corpus; run scripts/corpus.sh first, or pass --corpus");
  DocumentOptions opt;
  opt.invalid_utf8 = InvalidUtf8::Replace;
  opt.chat = [](const std::vector<ChatMessage>& m, const std::string&) {
    std::string s;
    for (const ChatMessage& x : m) s += x.content + "\n\n";
    return s;
  };
  DocumentReader reader(list_inputs(inputs), opt);
  // Keep the paragraphs with the smallest content hashes: a sample of the corpus that does not depend
  // on file order, with duplicates removed.
  std::map<uint64_t, std::string> kept;
  Document doc;
  while (reader.next(doc)) {
    size_t i = 0;
    const std::string& t = doc.text;
    while (i < t.size()) {
      size_t end = t.find("\n\n", i);
      while (end != std::string::npos) {  // a blank line may hold spaces
        size_t k = end + 1;
        while (k < t.size() && (t[k] == ' ' || t[k] == '\t' || t[k] == '\r')) ++k;
        if (k >= t.size() || t[k] == '\n') break;
        end = t.find("\n\n", end + 1);
      }
      if (end == std::string::npos) end = t.size();
      std::string p = collapse_ws(t.substr(i, end - i));
      i = end + 2;
      if (!is_prose(p)) continue;
      const uint64_t h = hash_bytes(kPoolSeed, p.data(), p.size());
      if (kept.size() >= max_paragraphs && h >= std::prev(kept.end())->first) continue;
      kept.emplace(h, std::move(p));
      if (kept.size() > max_paragraphs) kept.erase(std::prev(kept.end()));
    }
  }
  Haystack hay;
  for (auto& [h, p] : kept) hay.paragraphs_.push_back(std::move(p));
  KVD_CHECK(hay.paragraphs_.size() >= 50, "the corpus (", join(inputs, ", "), ") has only ", hay.paragraphs_.size(),
            " usable prose paragraphs; run scripts/corpus.sh, or pass --corpus with more English prose");
  hay.index_words();
  return hay;
}

Haystack Haystack::from_paragraphs(std::vector<std::string> paragraphs) {
  Haystack hay;
  for (std::string& p : paragraphs) {
    std::string c = collapse_ws(p);
    if (!c.empty()) hay.paragraphs_.push_back(std::move(c));
  }
  KVD_CHECK(!hay.paragraphs_.empty(), "Haystack: no paragraphs");
  hay.index_words();
  return hay;
}

void Haystack::index_words() {
  std::set<std::string> words;
  for (const std::string& p : paragraphs_) {
    size_t i = 0;
    while (i < p.size()) {
      if (!is_alpha(p[i])) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < p.size() && is_alpha(p[j])) ++j;
      const bool bounded = (i == 0 || !std::isalnum(static_cast<unsigned char>(p[i - 1]))) &&
                           (j == p.size() || !std::isalnum(static_cast<unsigned char>(p[j])));
      const size_t n = j - i;
      if (bounded && n >= 4 && n <= 10 && std::all_of(p.begin() + i, p.begin() + j, is_lower))
        words.insert(p.substr(i, n));
      i = j;
    }
  }
  words_.assign(words.begin(), words.end());
}

// ---- TaskGenerator ----------------------------------------------------------------------------------

TaskGenerator::TaskGenerator(const Tokenizer& tokenizer, const Haystack& haystack, double tolerance)
    : tok_(tokenizer), hay_(haystack), tol_(tolerance) {
  KVD_CHECK(tol_ > 0 && tol_ < 0.5, "tolerance ", tol_, " must be in (0, 0.5)");
}

int64_t TaskGenerator::count(const std::string& text) const {
  return static_cast<int64_t>(tok_.encode(text, AddSpecial::No).size());
}

namespace {

// Finds k in [lo, hi] whose build(k) has a token count closest to `target` (build is about monotone
// in k): interpolation search within a shrinking bracket. Returns the context and its count.
struct Fit {
  std::string text;
  int64_t tokens = -1;
};

Fit fit_length(int64_t target, int64_t lo, int64_t hi, double tol, const std::function<std::string(int64_t)>& build,
               const std::function<int64_t(const std::string&)>& count, const std::string& what) {
  Fit best;
  auto consider = [&](int64_t k) {
    Fit f{build(k), 0};
    f.tokens = count(f.text);
    if (best.tokens < 0 || std::llabs(f.tokens - target) < std::llabs(best.tokens - target)) best = f;
    return f.tokens;
  };
  int64_t flo = consider(lo);
  KVD_CHECK(flo <= target * (1 + tol), what, ": even the shortest context has ", flo, " tokens, more than the target ",
            target, "; use a longer length");
  int64_t fhi = consider(hi);
  KVD_CHECK(fhi >= target * (1 - tol), what, ": cannot reach ", target, " tokens (", fhi,
            " at most); the corpus is too small for this length");
  const int64_t good = std::max<int64_t>(1, static_cast<int64_t>(target * tol / 4));
  for (int it = 0; it < 60 && hi - lo > 1 && std::llabs(best.tokens - target) > good; ++it) {
    int64_t mid = fhi > flo ? lo + static_cast<int64_t>(static_cast<double>(target - flo) * (hi - lo) / (fhi - flo))
                            : (lo + hi) / 2;
    if (it % 3 == 2) mid = (lo + hi) / 2;  // bisect now and then: interpolation alone can stall
    mid = std::clamp(mid, lo + 1, hi - 1);
    const int64_t fm = consider(mid);
    if (fm < target) {
      lo = mid;
      flo = fm;
    } else {
      hi = mid;
      fhi = fm;
    }
  }
  return best;
}

// "The special magic number for <key> is: <value>."; niah_multiquery gives each key its own kind of
// number ("secret passcode", ...), so that the queries differ by more than their keys.
const std::vector<std::string>& number_kinds() {
  static const std::vector<std::string> k = {"special magic number", "secret passcode", "lucky number", "room number"};
  return k;
}
std::string magic_needle(const std::string& key, const std::string& value, size_t kind = 0) {
  return "The " + number_kinds().at(kind) + " for " + key + " is: " + value + ".";
}

// niah_multivalue's needles, in order of appearance: "The first special magic number for <key> is:
// <value>.", "The second ...".
std::string ordinal_needle(int i, const std::string& key, const std::string& value) {
  static const char* const kOrdinal[] = {"first", "second", "third", "fourth"};
  KVD_CHECK(i >= 0 && i < 4, "ordinal_needle: index ", i, " out of range");
  return std::string("The ") + kOrdinal[i] + " special magic number for " + key + " is: " + value + ".";
}

// A "word-word" key from the corpus words, unlike every key in `used`.
std::string make_key(Rng& rng, const Haystack& hay, std::set<std::string>& used) {
  const auto& w = hay.words();
  KVD_CHECK(w.size() >= 20, "the corpus has too few distinct words (", w.size(), ") to make keys");
  for (;;) {
    std::string k = rng.pick(w) + "-" + rng.pick(w);
    if (used.insert(k).second) return k;
  }
}

std::string make_number(Rng& rng, int digits, std::set<std::string>& used) {
  int64_t lo = 1;
  for (int i = 1; i < digits; ++i) lo *= 10;
  for (;;) {
    std::string v = std::to_string(rng.range(lo, lo * 10 - 1));
    if (used.insert(v).second) return v;
  }
}

std::string make_var(Rng& rng, std::set<std::string>& used) {
  for (;;) {
    std::string v;
    for (int i = 0; i < 5; ++i) v += static_cast<char>('A' + rng.below(26));
    if (used.insert(v).second) return v;
  }
}

// Reorders `pick` so that none of its first k words occurs in `prompt` (lower case): an answer that the
// question or the answer_prefix spells out would be no test. Later picks take the leaking ones' places.
void keep_answers_out_of(const std::string& prompt, const std::vector<std::string>& words, size_t k,
                         std::vector<size_t>& pick) {
  auto leaks = [&](size_t p) { return prompt.find(words[p]) != std::string::npos; };
  size_t next = k;
  for (size_t i = 0; i < k && i < pick.size(); ++i) {
    while (leaks(pick[i])) {
      while (next < pick.size() && leaks(pick[next])) ++next;
      KVD_CHECK(next < pick.size(), "the corpus words all occur in the prompt; use a larger corpus");
      std::swap(pick[i], pick[next++]);
    }
  }
}

// Sentences of a collapsed paragraph: split after . ! ? followed by a space and an upper-case letter.
std::vector<std::string> sentences(const std::string& p) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i + 2 < p.size(); ++i) {
    if ((p[i] == '.' || p[i] == '!' || p[i] == '?') && p[i + 1] == ' ' && p[i + 2] >= 'A' && p[i + 2] <= 'Z') {
      out.push_back(p.substr(start, i + 1 - start));
      start = i + 2;
    }
  }
  if (start < p.size()) out.push_back(p.substr(start));
  return out;
}

}  // namespace

TaskSample TaskGenerator::make(const std::string& task, int64_t length, uint64_t seed, int64_t index) const {
  const auto& names = ruler_tasks();
  const auto it = std::find(names.begin(), names.end(), task);
  KVD_CHECK(it != names.end(), "unknown task '", task, "'; the ruler suite has ", join(names, ", "));
  KVD_CHECK(length >= 64, "length ", length, " is too short for a task (at least 64 tokens)");
  const uint64_t task_id = static_cast<uint64_t>(it - names.begin());
  Rng rng(seed, task_id * 0x100000000ull + static_cast<uint64_t>(length), static_cast<uint64_t>(index));

  char idbuf[160];
  std::snprintf(idbuf, sizeof idbuf, "%s-%lld-%04lld", task.c_str(), static_cast<long long>(length),
                static_cast<long long>(index));
  TaskSample s;
  s.id = idbuf;
  s.task = task;
  const std::string what = s.id;
  auto counter = [this](const std::string& t) { return count(t); };

  // The haystack tasks: needles in corpus paragraphs, the number of haystack words fitted to the length.
  auto haystack_fit = [&](const std::vector<Needle>& needles, size_t exclude_paragraph) {
    Stream st;
    size_t next = static_cast<size_t>(rng.below(hay_.paragraphs().size()));
    extend_stream(st, hay_, next, exclude_paragraph, static_cast<size_t>(length) + 64);
    // Prose is about 1.3 tokens per word: length words are plenty unless the text is unusual.
    while (count(render(st, st.words.size(), needles)) < length)
      extend_stream(st, hay_, next, exclude_paragraph, st.words.size() * 2);
    const Fit f = fit_length(
        length, 0, static_cast<int64_t>(st.words.size()), tol_,
        [&](int64_t w) { return render(st, static_cast<size_t>(w), needles); }, counter, what);
    return f;
  };

  Fit fit;
  if (task.rfind("niah_", 0) == 0) {
    std::set<std::string> keys, values;
    std::vector<Needle> needles;
    std::vector<std::string> nkeys, nvalues;
    const bool multivalue = task == "niah_multivalue";
    const int n = task == "niah_single"     ? 1
                  : task == "niah_multikey" ? kMultiKeyNeedles
                  : multivalue              ? kMultiValueNeedles
                                            : kMultiQueryNeedles;
    const std::string shared_key = make_key(rng, hay_, keys);
    std::vector<double> depths(static_cast<size_t>(n));
    for (double& d : depths) d = rng.uniform();
    // niah_multivalue: the needles sit together at one random depth, in ordinal order (scattered needles left
    // SmolLM2-135M below 60% at 4K with a full cache: it repeated the first value).
    if (multivalue) std::fill(depths.begin(), depths.end(), depths[0]);
    for (int i = 0; i < n; ++i) {
      nkeys.push_back(multivalue || i == 0 ? shared_key : make_key(rng, hay_, keys));
      nvalues.push_back(make_number(rng, 7, values));
      const size_t kind = task == "niah_multiquery" ? static_cast<size_t>(i) : 0;
      needles.push_back({multivalue ? ordinal_needle(i, shared_key, nvalues.back()) : magic_needle(nkeys.back(), nvalues.back(), kind),
                         depths[static_cast<size_t>(i)]});
    }
    fit = haystack_fit(needles, static_cast<size_t>(-1));
    if (task == "niah_single" || task == "niah_multikey") {
      s.question = "What is the special magic number for " + nkeys[0] + " mentioned in the provided text?";
      s.answer_prefix = "The special magic number for " + nkeys[0] + " is:";
      s.answers = {nvalues[0]};
      s.max_new_tokens = 16;
    } else if (multivalue) {
      s.question = "What are all the special magic numbers for " + shared_key + " mentioned in the provided text?";
      s.answers = nvalues;  // in order of appearance, as the needles' ordinals say
      s.answer_prefix = "The first special magic number for " + shared_key + " is:";
      s.max_new_tokens = 20 * n;
    } else {  // multiquery
      std::string listed;
      for (int i = 0; i < n; ++i)
        listed += (i == 0 ? "the " : i + 1 < n ? ", the " : n > 2 ? ", and the " : " and the ") +
                  number_kinds()[static_cast<size_t>(i)] + " for " + nkeys[static_cast<size_t>(i)];
      s.question = "What are " + listed + " mentioned in the provided text?";
      s.answer_prefix = "The special magic number for " + nkeys[0] + " is:";
      s.answers = nvalues;
      s.max_new_tokens = 20 * n;
    }
  } else if (task == "vt") {
    std::set<std::string> vars, values;
    std::vector<Needle> needles;
    std::string value;
    for (int chain = 0; chain < kVtChains; ++chain) {  // chain 0 is asked about, the others are distractors
      const std::string v = make_number(rng, 5, values);
      if (chain == 0) value = v;
      std::vector<double> depths(kVtChain);
      for (double& d : depths) d = rng.uniform();
      std::sort(depths.begin(), depths.end());
      std::string prev;
      for (int hop = 0; hop < kVtChain; ++hop) {
        const std::string name = make_var(rng, vars);
        needles.push_back({(hop == 0 ? "The value " + v : "The value of VAR " + prev) + " is assigned to VAR " + name + ".",
                           depths[static_cast<size_t>(hop)]});
        if (chain == 0) s.answers.push_back(name);
        prev = name;
      }
    }
    fit = haystack_fit(needles, static_cast<size_t>(-1));
    s.question = "Find all variables that are assigned the value " + value +
                 " in the text above. A variable that is assigned the value of another variable holds that value "
                 "too.";
    s.answer_prefix = "Answer: According to the chain of variable assignments in the text above, " +
                      std::to_string(kVtChain) + " variables are assigned the value " + value + ", they are: VAR";
    s.max_new_tokens = 8 * kVtChain + 8;
  } else if (task == "cwe") {
    const auto& words = hay_.words();
    KVD_CHECK(words.size() >= 50, what, ": the corpus has too few distinct words (", words.size(), ")");
    // Items the length holds, from the tokens of a sample list; the common word fills about a third of
    // the list, every other word occurs once.
    std::string probe;
    for (size_t i = 0; i < 40; ++i) probe += (i ? " " : "") + std::to_string(100 + i) + ". \"" + words[i * words.size() / 40] + "\"";
    const double tokens_per_item = std::max(1.0, static_cast<double>(count(probe)) / 40);
    const int64_t items = static_cast<int64_t>(static_cast<double>(length) / tokens_per_item);
    const int64_t freq_cw = std::max<int64_t>(4, items / 3);
    const int64_t max_uncommon = std::min<int64_t>(static_cast<int64_t>(words.size()) - kCweWords, 2 * items + 10);
    KVD_CHECK(max_uncommon > 0, what, ": the corpus has too few distinct words (", words.size(), ")");
    if (kCweWords == 1) {
      s.question = "What is the most common word in the above list?";
      s.answer_prefix = "Answer: The word that appears most often in the list is: \"";
    } else {
      s.question = "What are the " + std::to_string(kCweWords) + " most common words in the above list?";
      s.answer_prefix = "Answer: The top " + std::to_string(kCweWords) + " words that appear most often in the list are:";
    }
    s.max_new_tokens = 8 * kCweWords + 8;
    std::vector<size_t> pick = sample_distinct(rng, words.size(), static_cast<size_t>(kCweWords + max_uncommon));
    keep_answers_out_of(s.question + s.answer_prefix, words, kCweWords, pick);
    const uint64_t shuffle_seed = rng.next();
    for (size_t i = 0; i < kCweWords; ++i) s.answers.push_back(words[pick[i]]);
    auto build = [&](int64_t k) {
      std::vector<const std::string*> list;
      for (size_t i = 0; i < kCweWords; ++i)
        for (int64_t r = 0; r < freq_cw; ++r) list.push_back(&words[pick[i]]);
      for (int64_t i = 0; i < k; ++i) list.push_back(&words[pick[static_cast<size_t>(kCweWords + i)]]);
      Rng sh(shuffle_seed);
      sh.shuffle(list);
      std::string out;
      for (size_t i = 0; i < list.size(); ++i) out += (i ? " " : "") + std::to_string(i + 1) + ". \"" + *list[i] + "\"";
      return out;
    };
    fit = fit_length(length, 0, max_uncommon, tol_, build, counter, what);
  } else if (task == "fwe") {
    const auto& words = hay_.words();
    const int64_t max_top = std::max<int64_t>(64, length);
    const int64_t vocab = std::min<int64_t>(static_cast<int64_t>(words.size()), kFweVocab);
    KVD_CHECK(vocab >= 50, what, ": the corpus has too few distinct words (", words.size(), ")");
    if (kFweWords == 1) {
      s.question = "What is the most frequently appeared word in the above text?";
      s.answer_prefix = "Answer: According to the text above, the most frequently appeared word is: \"";
    } else {
      s.question = "What are the " + std::to_string(kFweWords) + " most frequently appeared words in the above text?";
      s.answer_prefix = "Answer: According to the text above, the " + std::to_string(kFweWords) +
                        " most frequently appeared words are:";
    }
    s.max_new_tokens = 8 * kFweWords + 8;
    std::vector<size_t> pick = sample_distinct(rng, words.size(), static_cast<size_t>(vocab));
    keep_answers_out_of(s.question + s.answer_prefix, words, kFweWords, pick);
    const uint64_t shuffle_seed = rng.next();
    for (size_t i = 0; i < kFweWords; ++i) s.answers.push_back(words[pick[i]]);
    // Zipf(2) counts: word i (1-based) occurs max(1, floor(c / i^2)) times, over min(c, vocab) words.
    auto build = [&](int64_t c) {
      std::vector<const std::string*> list;
      const int64_t v = std::min(c, vocab);
      for (int64_t i = 1; i <= v; ++i) {
        const int64_t f = std::max<int64_t>(1, c / (i * i));
        for (int64_t r = 0; r < f; ++r) list.push_back(&words[pick[static_cast<size_t>(i - 1)]]);
      }
      Rng sh(shuffle_seed);
      sh.shuffle(list);
      std::string out;
      for (size_t i = 0; i < list.size(); ++i) out += (i ? " \"" : "\"") + *list[i] + "\"";
      return out;
    };
    fit = fit_length(length, 18, max_top, tol_, build, counter, what);  // c >= 18: the top 3 counts are distinct
  } else {  // qa
    const auto& paras = hay_.paragraphs();
    s.question = "The answer below quotes the beginning of a sentence of the text above. Continue the quotation "
                 "with the next words of that sentence.";
    for (int attempt = 0;; ++attempt) {
      KVD_CHECK(attempt < 200, what, ": found no corpus sentence to ask about; use a larger corpus");
      const size_t gold = static_cast<size_t>(rng.below(paras.size()));
      std::vector<std::string> cands;
      for (const std::string& sent : sentences(paras[gold])) {
        const size_t nw = split_words(sent).size();
        if (nw >= 12 && nw <= 60) cands.push_back(sent);
      }
      if (cands.empty()) continue;
      const std::string sent = rng.pick(cands);
      std::vector<std::string> sw = split_words(sent);
      std::vector<size_t> options;
      for (size_t i = 3; i < sw.size(); ++i) {
        std::string core = sw[i];
        while (!core.empty() && std::string_view(".,;:!?)\"'").find(core.back()) != std::string_view::npos) core.pop_back();
        if (core.size() < 5 || !std::all_of(core.begin(), core.end(), is_lower)) continue;
        if (s.question.find(core) != std::string::npos) continue;  // the question must not spell the answer
        size_t same = 0;
        for (const std::string& x : sw) same += x.find(core) != std::string::npos;
        if (same == 1) options.push_back(i);
      }
      if (options.empty()) continue;
      const size_t wi = options[static_cast<size_t>(rng.below(options.size()))];
      std::string core = sw[wi];
      while (std::string_view(".,;:!?)\"'").find(core.back()) != std::string_view::npos) core.pop_back();
      const std::string prefix = join(sw, " ", 0, wi);
      fit = haystack_fit({{paras[gold], rng.uniform()}}, gold);
      // The quoted beginning must occur once, so its next word is unambiguous.
      if (count_occurrences(fit.text, prefix) != 1 || count_occurrences(fit.text, prefix + " " + core) != 1) continue;
      s.answer_prefix = "\"" + prefix;
      s.answers = {core};
      s.max_new_tokens = 8;
      break;
    }
  }

  s.context = std::move(fit.text);
  s.length = fit.tokens;
  const double err = std::abs(static_cast<double>(s.length - length)) / static_cast<double>(length);
  KVD_CHECK(err <= tol_, what, ": context has ", s.length, " tokens, more than ", tol_ * 100, "% from ", length);
  for (const std::string& a : s.answers)
    KVD_CHECK(s.context.find(a) != std::string::npos, what, ": answer '", a, "' is not in the context (a bug)");
  return s;
}

// ---- the suite -----------------------------------------------------------------------------------------

std::vector<int64_t> parse_lengths(const std::string& s) {
  std::vector<int64_t> out;
  size_t i = 0;
  while (i <= s.size()) {
    const size_t j = std::min(s.find(',', i), s.size());
    std::string t = s.substr(i, j - i);
    i = j + 1;
    int64_t mult = 1;
    if (!t.empty() && (t.back() == 'k' || t.back() == 'K')) {
      mult = 1024;
      t.pop_back();
    }
    KVD_CHECK(!t.empty() && t.size() <= 9 && std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; }),
              "--lengths '", s, "': expected comma-separated token counts such as 1024,2048,4k");
    out.push_back(std::stoll(t) * mult);
    if (j == s.size()) break;
  }
  return out;
}

TaskSuiteStats write_task_suite(const TaskSuiteOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  KVD_CHECK(opt.suite == "ruler", "--suite '", opt.suite, "': only 'ruler' is available");
  KVD_CHECK(opt.samples >= 1, "--samples ", opt.samples, ": must be at least 1");
  KVD_CHECK(!opt.lengths.empty(), "--lengths: give at least one length");
  for (int64_t l : opt.lengths) KVD_CHECK(l >= 64, "--lengths: ", l, " is too short (at least 64 tokens)");
  std::vector<std::string> tasks = opt.tasks.empty() ? ruler_tasks() : opt.tasks;
  for (const std::string& t : tasks)
    KVD_CHECK(std::find(ruler_tasks().begin(), ruler_tasks().end(), t) != ruler_tasks().end(), "--tasks: unknown task '",
              t, "'; the ruler suite has ", join(ruler_tasks(), ", "));
  const Tokenizer tok = Tokenizer::from_file(opt.model_dir);
  const Haystack hay = Haystack::from_inputs(opt.corpus);
  const TaskGenerator gen(tok, hay, opt.tolerance);

  TaskSuiteStats stats;
  write_file_atomic(opt.out, [&](std::ostream& os) {
    for (const std::string& task : tasks) {
      for (int64_t length : opt.lengths) {
        for (int64_t i = 0; i < opt.samples; ++i) {
          const TaskSample s = gen.make(task, length, opt.seed, i);
          nlohmann::ordered_json j;
          j["id"] = s.id;
          j["context"] = s.context;
          j["question"] = s.question;
          j["answers"] = s.answers;
          j["task"] = s.task;
          j["length"] = s.length;
          if (!s.answer_prefix.empty()) j["answer_prefix"] = s.answer_prefix;
          if (s.max_new_tokens > 0) j["max_new_tokens"] = s.max_new_tokens;
          os << j.dump() << "\n";
          ++stats.samples;
          stats.max_rel_error = std::max(stats.max_rel_error, std::abs(static_cast<double>(s.length - length)) / length);
        }
      }
    }
  });
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace kvd
