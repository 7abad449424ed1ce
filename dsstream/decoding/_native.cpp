// Compiled core of the CTC prefix beam search (dsstream/decoding/search.py).
//
// It mirrors the Python reference operation for operation, in the same order,
// with the same double arithmetic and libm calls, so both give identical
// results (tested).  The GIL is released while frames are processed; LM scores
// come from KenLM's C++ model directly (see LMInfo), or, where that model
// cannot be reached, from the Python KenLM wrapper with the GIL taken for each
// (state, word) pair the shared native cache does not hold yet.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;

// KenLM's virtual interface (lm/virtual_interface.hh), declared as KenLM
// declares it: same virtual functions in the same order, same data members.
// The model is the one the Python `kenlm` package has loaded; it is reached
// through that object and called through its own vtable, so nothing of KenLM
// is compiled or linked here and the model's memory is not held twice.
// LMInfo checks the layout and the scores against the Python API before it
// trusts any of this, and falls back to asking Python if anything differs.
// Outside the anonymous namespace: with internal linkage the compiler would
// know no class derives from these and turn the calls into pure-virtual ones.
namespace kenlm_abi {
using WordIndex = unsigned int;
struct StringPiece {
  const char* ptr;
  size_t length;
};
struct FullScoreReturn {
  float prob;
  unsigned char ngram_length;
  bool independent_left;
  uint64_t extend_left;
  float rest;
};
class Vocabulary {
 public:
  virtual ~Vocabulary() = default;
  virtual WordIndex Index(const StringPiece& str) const = 0;
  virtual WordIndex Index(const std::string& str) const = 0;
  virtual WordIndex Index(const char* str) const = 0;
  WordIndex begin_sentence_, end_sentence_, not_found_;
};
class Model {
 public:
  virtual ~Model() = default;
  virtual float BaseScore(const void* in_state, WordIndex new_word, void* out_state) const = 0;
  virtual FullScoreReturn BaseFullScore(const void* in_state, WordIndex new_word,
                                        void* out_state) const = 0;
  virtual FullScoreReturn BaseFullScoreForgotState(const WordIndex* context_rbegin,
                                                   const WordIndex* context_rend,
                                                   WordIndex new_word, void* out_state) const = 0;
  const size_t state_size_;
  const void *begin_sentence_memory_, *null_context_memory_;
  const Vocabulary* base_vocab_;
  unsigned char order_;
};
// The Python package's `kenlm.Model` (python/kenlm.pyx): a Cython class
// with these three C fields and no methods table.
struct PyModel {
  PyObject_HEAD Model* model;
  PyObject* path;
  const Vocabulary* vocab;
};
}  // namespace kenlm_abi

namespace {

constexpr double NEG = -std::numeric_limits<double>::infinity();
constexpr int OOV_SCALE_CHARS = 6;  // as in search.py

inline double logaddexp(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == NEG) return a;
  return a + std::log1p(std::exp(b - a));
}

struct PairHash {
  size_t operator()(const std::pair<int, std::string>& k) const {
    return std::hash<std::string>()(k.second) * 31u + static_cast<size_t>(k.first);
  }
};

// A byte trie of words: a partial word is a prefix of a word iff its walk
// stays inside (node >= 0), and a word is in the set iff it ends on a terminal
// node.  Same answers as the Python prefix and word sets, without hashing whole
// strings for every candidate extension.
class WordTrie {
 public:
  // `scores` (empty, or one per word): each node's best() is the maximum
  // score of the words below it (the lookahead of Lexicon.lookahead).
  // `unk`: the score of a word outside the set (the lookahead of a partial
  // word that leaves the trie).
  explicit WordTrie(const std::vector<std::string>& words,
                    const std::vector<double>& scores = {}, double unk = 0.0)
      : unk_(unk) {
    const bool scored = !scores.empty();
    if (scored && scores.size() != words.size())
      throw std::invalid_argument("WordTrie needs one score per word");
    std::vector<std::vector<std::pair<unsigned char, int>>> kids(1);
    std::vector<uint8_t> terminal(1, 0);
    std::vector<double> best(1, NEG);
    uint64_t print = 1469598103934665603ull;  // FNV-1a over the words in order
    for (size_t w = 0; w < words.size(); ++w) {
      int node = 0;
      for (unsigned char c : words[w]) {
        print = (print ^ c) * 1099511628211ull;
        int next = -1;
        for (const auto& kv : kids[node])
          if (kv.first == c) next = kv.second;
        if (next < 0) {
          next = static_cast<int>(kids.size());
          kids[node].push_back({c, next});
          kids.emplace_back();
          terminal.push_back(0);
          best.push_back(NEG);
        }
        node = next;
        if (scored && scores[w] > best[node]) best[node] = scores[w];
      }
      print = (print ^ 0xffu) * 1099511628211ull;
      terminal[node] = 1;
    }
    scored_ = scored;
    fingerprint_ = print ^ words.size();
    // Children in one array (node n's from nodes_[n].first to nodes_[n + 1].first);
    // nodes with many children (the root, the first letters) answer from a
    // 256-entry table instead of a scan: the search walks them most.  A
    // node's score and flag sit beside its links: the search reads them right
    // after the walk.
    nodes_.resize(kids.size() + 1);
    for (size_t n = 0; n < kids.size(); ++n) {
      nodes_[n].first = static_cast<int>(edges_.size());
      nodes_[n].best = best[n];
      nodes_[n].terminal = terminal[n];
      edges_.insert(edges_.end(), kids[n].begin(), kids[n].end());
      if (kids[n].size() <= kDenseAbove) continue;
      nodes_[n].dense = static_cast<int>(table_.size());
      table_.resize(table_.size() + 256, -1);
      for (const auto& kv : kids[n]) table_[nodes_[n].dense + kv.first] = kv.second;
    }
    nodes_.back().first = static_cast<int>(edges_.size());
  }

  bool scored() const { return scored_; }
  double best(int node) const { return nodes_[node].best; }
  double unk() const { return unk_; }
  // Equal for tries of the same word list, which number their nodes alike.
  uint64_t fingerprint() const { return fingerprint_; }

  int walk(int node, const std::string& bytes) const {
    for (unsigned char c : bytes) {
      if (node < 0) return -1;
      node = child(node, c);
    }
    return node;
  }
  bool terminal(int node) const { return node >= 0 && nodes_[node].terminal; }
  size_t size() const { return nodes_.size() - 1; }

 private:
  static constexpr size_t kDenseAbove = 6;  // children: past a short scan
  struct Node {
    int first = 0;   // its children's start in edges_
    int dense = -1;  // offset of its table in table_, or -1
    double best = NEG;
    bool terminal = false;
  };

  int child(int node, unsigned char c) const {
    const Node& n = nodes_[node];
    if (n.dense >= 0) return table_[n.dense + c];
    const int end = nodes_[node + 1].first;
    for (int i = n.first; i < end; ++i)
      if (edges_[i].first == c) return edges_[i].second;
    return -1;
  }

  std::vector<Node> nodes_;  // one per node, plus an end marker
  std::vector<std::pair<unsigned char, int>> edges_;
  std::vector<int> table_;
  bool scored_ = false;
  double unk_;
  uint64_t fingerprint_ = 0;
};

constexpr double LN10 = 2.302585092994046;  // as lm.py

// Read-only LM facts (its vocabulary as a trie) plus a shared
// (state, word) -> (ln p, next state) cache.  Scores come from KenLM directly
// (`direct()`) when the loaded model passed LMInfo's checks, else from the
// Python wrapper (KenLM._score_uncached) with the GIL taken for each miss.
class LMInfo {
 public:
  LMInfo(py::object lm, const std::vector<std::string>& vocab, int begin_state)
      : lm_(lm), score_(lm.attr("_score_uncached")), vocab_(vocab), begin_state_(begin_state) {
    attach(lm, vocab);
  }

  int walk(int node, const std::string& bytes) const { return vocab_.walk(node, bytes); }
  bool terminal(int node) const { return vocab_.terminal(node); }
  int begin_state() const { return begin_state_; }
  bool direct() const { return model_ != nullptr; }
  // KenLM queries made directly (not answered by the cache).
  size_t lookups() {
    std::lock_guard<std::mutex> guard(mutex_);
    return lookups_;
  }
  const WordTrie& vocab() const { return vocab_; }

  // ln p(word | state) and the next state; `node` is the word's node in the
  // vocabulary trie (a terminal one), or -1 for <unk>.  Called without the GIL.
  std::pair<double, int> score(int state, int node, const std::string& word) {
    if (!model_) return score_py(state, node >= 0 ? word : std::string("<unk>"));
    return score_direct(state, node >= 0 ? node_word_[node] : unk_);
  }
  std::pair<double, int> score_end(int state) {
    if (!model_) return score_py(state, "</s>");
    return score_direct(state, end_);
  }

 private:
  // Use the Python model's C++ object only if every check holds.
  void attach(py::object lm, const std::vector<std::string>& vocab) {
    using namespace kenlm_abi;
    py::object model = lm.attr("model");
    if (std::string(Py_TYPE(model.ptr())->tp_name) != "kenlm.Model") return;
    auto* obj = reinterpret_cast<PyModel*>(model.ptr());
    if (obj->model == nullptr || obj->vocab != obj->model->base_vocab_) return;
    py::object path = model.attr("path");
    if (obj->path != path.ptr()) return;
    model_ref_ = model;  // the C++ model lives as long as this Python object
    const Model& m = *obj->model;
    // lm/state.hh: WordIndex words[N-1]; float backoff[N-1]; unsigned char length.
    const size_t size = m.state_size_;
    if (size < 12 || (size - 4) % 8 != 0 || size > 1024) return;
    if (m.order_ != model.attr("order").cast<int>()) return;
    const size_t slots = (size - 4) / 8;
    length_at_ = slots * 8;
    backoff_at_ = slots * 4;
    state_size_ = size;
    const Vocabulary& v = *m.base_vocab_;
    unk_ = v.Index("<unk>");
    end_ = v.Index("</s>");
    node_word_.assign(vocab_.size(), unk_);
    for (const auto& w : vocab) node_word_[vocab_.walk(0, w)] = v.Index(w.c_str());
    std::vector<char> begin(static_cast<const char*>(m.begin_sentence_memory_),
                            static_cast<const char*>(m.begin_sentence_memory_) + size);
    model_ = obj->model;
    native_begin_ = intern(begin.data());
    if (!agrees(vocab)) {
      model_ = nullptr;
      states_.clear();
      ids_.clear();
      cache_.clear();
      return;
    }
    begin_state_ = native_begin_;
  }

  // The direct scores equal the Python wrapper's on a spread of words, one
  // and two words after the sentence start and at its end.
  bool agrees(const std::vector<std::string>& vocab) {
    const size_t n = vocab.size(), step = std::max<size_t>(1, n / 24);
    for (size_t i = 0; i < n; i += step) {
      const int node = vocab_.walk(0, vocab[i]);
      const auto py1 = score_py(begin_state_, vocab[i]);
      const auto c1 = score_direct(native_begin_, node_word_[node]);
      if (py1.first != c1.first) return false;
      const std::string& next = vocab[(i * 7 + 3) % n];
      const auto py2 = score_py(py1.second, next);
      const auto c2 = score_direct(c1.second, node_word_[vocab_.walk(0, next)]);
      if (py2.first != c2.first) return false;
      if (score_py(py2.second, "</s>").first != score_direct(c2.second, end_).first) return false;
      if (score_py(py1.second, "<unk>").first != score_direct(c1.second, unk_).first) return false;
    }
    py_cache_.clear();  // the checks' pairs used Python's state ids
    return true;
  }

  std::pair<double, int> score_direct(int state, kenlm_abi::WordIndex word) {
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(state)) << 32) | word;
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    std::string out(state_size_, '\0');
    const float logp10 = model_->BaseScore(states_[state].data(), word, out.data());
    ++lookups_;
    std::pair<double, int> result{static_cast<double>(logp10) * LN10, intern(out.data())};
    cache_.emplace(key, result);
    return result;
  }

  // A state's id; the words and backoffs past its length are zeroed so that
  // equal states (KenLM's State::operator==) have equal bytes.
  int intern(const char* raw) {
    std::string s(raw, state_size_);
    const unsigned char length = static_cast<unsigned char>(s[length_at_]);
    for (size_t i = length; i * 4 < backoff_at_; ++i) {
      std::memset(&s[i * 4], 0, 4);
      std::memset(&s[backoff_at_ + i * 4], 0, 4);
    }
    for (size_t i = length_at_ + 1; i < state_size_; ++i) s[i] = 0;  // padding
    auto found = ids_.find(s);
    if (found != ids_.end()) return found->second;
    const int id = static_cast<int>(states_.size());
    states_.push_back(s);
    ids_.emplace(std::move(s), id);
    return id;
  }

  std::pair<double, int> score_py(int state, const std::string& word) {
    auto key = std::make_pair(state, word);
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = py_cache_.find(key);
      if (it != py_cache_.end()) return it->second;
    }
    std::pair<double, int> result;
    {
      py::gil_scoped_acquire gil;
      py::tuple out = score_(state, word);
      result = {out[0].cast<double>(), out[1].cast<int>()};
    }
    std::lock_guard<std::mutex> guard(mutex_);
    py_cache_.emplace(key, result);
    return result;
  }

  py::object lm_;         // the Python KenLM wrapper
  py::object model_ref_;  // its kenlm.Model when scored directly: keeps the C++ model alive
  py::object score_;  // KenLM._score_uncached: this object caches what it asks
  WordTrie vocab_;
  int begin_state_;
  std::mutex mutex_;
  std::unordered_map<std::pair<int, std::string>, std::pair<double, int>, PairHash> py_cache_;
  // Direct scoring.
  const kenlm_abi::Model* model_ = nullptr;
  size_t state_size_ = 0, length_at_ = 0, backoff_at_ = 0;
  kenlm_abi::WordIndex unk_ = 0, end_ = 0;
  std::vector<kenlm_abi::WordIndex> node_word_;  // vocabulary trie node -> KenLM word index
  std::vector<std::string> states_;
  std::unordered_map<std::string, int> ids_;
  std::unordered_map<uint64_t, std::pair<double, int>> cache_;
  int native_begin_ = 0;
  size_t lookups_ = 0;
};

struct Trie {
  std::vector<std::unordered_map<std::string, int>> children;
  std::vector<double> score;
  std::vector<bool> terminal;
  std::unordered_set<std::string> words;
  bool present = false;
};

struct HW {
  int node = 0;
  double anchor = 0.0;
  double banked = 0.0;
};

struct Ctx {
  double lm_score;
  int lm_state;
  std::string partial;  // UTF-8
  int partial_len;      // in characters (code points), as Python's len()
  int lm_node;          // the partial word's node in the LM vocabulary trie; -1 outside
  int lex_node;         // ... in the lexicon's trie (lexicon mode); -1 outside
  HW hw;
  int words;
  double score;
};

struct Config {
  int beam_width;
  double alpha, beta, unk_offset, beam_prune_logp, token_min_logp, lexicon_prune_logp;
  int top_k;
  bool has_blank_skip;
  double blank_skip_logp;
  bool has_lexicon_unk;
  double lexicon_unk;
};

struct Beam {
  int node;
  double pb, pnb;
};

constexpr int kUnwalked = -2;  // Entry::lex: the lexicon node is not known yet
constexpr int kBlocked = -3;   // lex_after: lexicon mode forbids the extension

// int64 -> int with open addressing (keys >= 0, never removed): the prefix
// tree's child lookup, made for every beam and candidate token of a frame.
class FlatMap {
 public:
  FlatMap() : keys_(kStart, -1), vals_(kStart) {}

  int find(int64_t key) const {
    for (size_t i = slot(key);; i = (i + 1) & (keys_.size() - 1)) {
      if (keys_[i] == key) return vals_[i];
      if (keys_[i] < 0) return -1;
    }
  }

  void insert(int64_t key, int value) {
    if (2 * (size_ + 1) > keys_.size()) grow();
    put(key, value);
  }

 private:
  static constexpr size_t kStart = 1024;

  size_t slot(int64_t key) const {
    return static_cast<size_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> 20) &
           (keys_.size() - 1);
  }

  void put(int64_t key, int value) {
    size_t i = slot(key);
    while (keys_[i] >= 0 && keys_[i] != key) i = (i + 1) & (keys_.size() - 1);
    if (keys_[i] < 0) ++size_;
    keys_[i] = key;
    vals_[i] = value;
  }

  void grow() {
    std::vector<int64_t> keys(keys_.size() * 2, -1);
    std::vector<int> vals(keys.size());
    keys.swap(keys_);
    vals.swap(vals_);
    size_ = 0;
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] >= 0) put(keys[i], vals[i]);
  }

  std::vector<int64_t> keys_;
  std::vector<int> vals_;
  size_t size_ = 0;
};

class Core {
 public:
  Core(int blank, std::vector<bool> starts, std::vector<std::vector<std::string>> chars,
       py::dict cfg, std::shared_ptr<LMInfo> lm, py::object trie,
       std::shared_ptr<WordTrie> lexicon)
      : blank_(blank),
        starts_(std::move(starts)),
        chars_(std::move(chars)),
        lm_(std::move(lm)),
        lex_(std::move(lexicon)) {
    cfg_.beam_width = cfg["beam_width"].cast<int>();
    cfg_.alpha = cfg["alpha"].cast<double>();
    cfg_.beta = cfg["beta"].cast<double>();
    cfg_.unk_offset = cfg["unk_offset"].cast<double>();
    cfg_.beam_prune_logp = cfg["beam_prune_logp"].cast<double>();
    cfg_.lexicon_prune_logp = cfg["lexicon_prune_logp"].cast<double>();
    cfg_.token_min_logp = cfg["token_min_logp"].cast<double>();
    cfg_.top_k = cfg["top_k"].cast<int>();
    cfg_.has_blank_skip = !cfg["blank_skip_logp"].is_none();
    cfg_.blank_skip_logp = cfg_.has_blank_skip ? cfg["blank_skip_logp"].cast<double>() : 0.0;
    cfg_.has_lexicon_unk = !cfg["lexicon_unk"].is_none();
    cfg_.lexicon_unk = cfg_.has_lexicon_unk ? cfg["lexicon_unk"].cast<double>() : 0.0;
    if (!trie.is_none()) {
      trie_.present = true;
      for (auto item : trie.attr("children")) {
        std::unordered_map<std::string, int> m;
        for (auto kv : item.cast<py::dict>()) m[kv.first.cast<std::string>()] = kv.second.cast<int>();
        trie_.children.push_back(std::move(m));
      }
      trie_.score = trie.attr("score").cast<std::vector<double>>();
      trie_.terminal = trie.attr("terminal").cast<std::vector<bool>>();
      for (auto w : trie.attr("words")) trie_.words.insert(w.cast<std::string>());
    }
    lex_strict_ = lex_ && !cfg_.has_lexicon_unk && !trie_.present;
    // The default lexicon is the LM's vocabulary: one walk serves both tries.
    same_trie_ = lex_ && lm_ && lex_->fingerprint() == lm_->vocab().fingerprint() &&
                 lex_->size() == lm_->vocab().size();
    HW root_hw;
    parent_.push_back(-1);
    token_.push_back(-1);
    frame_.push_back(-1);
    logp_.push_back(0.0);
    ctx_.push_back(make_ctx(0.0, lm_ ? lm_->begin_state() : 0, "", 0, 0, 0, root_hw, 0));
    beams_.push_back({0, 0.0, NEG});
  }

  int frames() const { return frames_; }

  void advance(py::array_t<double, py::array::c_style | py::array::forcecast> arr) {
    auto buf = arr.unchecked<2>();
    const int64_t T = buf.shape(0), V = buf.shape(1);
    py::gil_scoped_release nogil;
    std::vector<double> row(V);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t v = 0; v < V; ++v) row[v] = buf(t, v);
      frame(row);
      ++frames_;
    }
  }

  py::list beams() const {
    py::list out;
    for (const auto& b : beams_) out.append(py::make_tuple(b.node, b.pb, b.pnb));
    return out;
  }

  // (node, final score, acoustic), best first.
  py::list finish(bool lenient) {
    struct F { double score; size_t order; int node; double acoustic; };
    std::vector<F> finals;
    {
      py::gil_scoped_release nogil;
      for (size_t i = 0; i < beams_.size(); ++i) {
        const Beam& b = beams_[i];
        double lm_score;
        HW hw;
        const bool dropped = final_context(ctx_[b.node], lenient, lm_score, hw);
        double bonus = trie_.present ? hw.banked : 0.0;
        double acoustic = logaddexp(b.pb, b.pnb);
        int shown = b.node;
        if (dropped)  // the prefix before the unfinished word
          while (!ctx_[shown].partial.empty()) shown = parent_[shown];
        finals.push_back({acoustic + lm_score + bonus, i, shown, acoustic});
      }
      std::stable_sort(finals.begin(), finals.end(), [](const F& a, const F& b) {
        if (a.score != b.score) return a.score > b.score;
        return a.order < b.order;
      });
    }
    py::list out;
    for (const auto& f : finals) out.append(py::make_tuple(f.node, f.score, f.acoustic));
    return out;
  }

  // The nodes from the first token to `node`.
  std::vector<int> path(int node) const {
    std::vector<int> nodes;
    while (node > 0) {
      nodes.push_back(node);
      node = parent_[node];
    }
    std::reverse(nodes.begin(), nodes.end());
    return nodes;
  }

  // Tokens, frames and emission log-probs from the first token to `node`.
  py::tuple path_info(int node) const {
    const std::vector<int> nodes = path(node);
    std::vector<int> toks, frames;
    std::vector<double> logps;
    for (int n : nodes) {
      toks.push_back(token_[n]);
      frames.push_back(frame_[n]);
      logps.push_back(logp_[n]);
    }
    return py::make_tuple(toks, frames, logps);
  }

  // search.py's path_text: the words the path to `node` spells.
  std::string text(int node) const {
    std::string out, current;
    for (int n : path(node)) {
      const int tok = token_[n];
      if (starts_[tok] && !current.empty()) {
        if (!out.empty()) out += ' ';
        out += current;
        current.clear();
      }
      for (const auto& ch : chars_[tok]) current += ch;
    }
    if (!current.empty()) {
      if (!out.empty()) out += ' ';
      out += current;
    }
    return out;
  }

  // search.py's word_times: (word, first frame, last frame, mean log-prob)
  // of each word on the path to `node`.
  py::list word_times(int node) const {
    const std::vector<int> nodes = path(node);
    std::vector<int> ordered(nodes.size());
    int running = std::numeric_limits<int>::max();
    for (size_t i = nodes.size(); i-- > 0;) {
      running = std::min(running, frame_[nodes[i]]);
      ordered[i] = running;
    }
    py::list out;
    std::string current;
    int first = 0, last = 0, count = 0;
    double sum = 0.0;
    const auto flush = [&]() {
      out.append(py::make_tuple(current, first, last, sum / count));
      current.clear();
      count = 0;
      sum = 0.0;
    };
    for (size_t i = 0; i < nodes.size(); ++i) {
      const int tok = token_[nodes[i]];
      if (starts_[tok] && !current.empty()) flush();
      if (chars_[tok].empty()) continue;
      for (const auto& ch : chars_[tok]) current += ch;
      if (count == 0) first = ordered[i];
      last = ordered[i];
      sum += logp_[nodes[i]];
      ++count;
    }
    if (!current.empty()) flush();
    return out;
  }

  size_t num_nodes() const { return parent_.size(); }

 private:
  // -- hotwords (HotwordTrie in hotwords.py) --------------------------------
  double hw_bonus(const HW& s) const { return s.banked + trie_.score[s.node] - s.anchor; }

  HW hw_char(const HW& s, const std::string& ch, bool word_start) const {
    if (s.node == 0) {
      if (!word_start) return s;
      auto it = trie_.children[0].find(ch);
      if (it == trie_.children[0].end()) return s;
      return {it->second, 0.0, s.banked};
    }
    auto it = trie_.children[s.node].find(ch);
    if (it != trie_.children[s.node].end()) return {it->second, s.anchor, s.banked};
    int nxt = 0;
    if (word_start) {
      auto r = trie_.children[0].find(ch);
      if (r != trie_.children[0].end()) nxt = r->second;
    }
    return {nxt, 0.0, s.banked};
  }

  HW hw_word_end(const HW& s) const {
    int node = s.node;
    double anchor = s.anchor, banked = s.banked;
    if (node == 0) return s;
    if (trie_.terminal[node]) {
      banked += trie_.score[node] - anchor;
      anchor = trie_.score[node];
    }
    auto it = trie_.children[node].find(" ");
    if (it != trie_.children[node].end()) return {it->second, anchor, banked};
    return {0, 0.0, banked};
  }

  HW hw_finish(const HW& s) const {
    HW e = hw_word_end(s);
    return {0, 0.0, e.banked};
  }

  // -- contexts (BeamSearch._context / _word / extend) ------------------------
  static double oov_scale(int n) {
    return n > OOV_SCALE_CHARS ? static_cast<double>(n) / OOV_SCALE_CHARS : 1.0;
  }

  Ctx make_ctx(double lm_score, int state, std::string partial, int partial_len, int lm_node,
               int lex_node, const HW& hw, int words) const {
    double score = lm_score;
    if (trie_.present) score += hw_bonus(hw);
    if (!partial.empty() && !(trie_.present && hw.node != 0)) {
      if (lex_) {
        if (lex_node >= 0) {
          if (lex_->scored()) score += cfg_.alpha * lex_->best(lex_node);
        } else if (!cfg_.has_lexicon_unk) {
          score = NEG;  // forbidden
        } else {
          score += cfg_.lexicon_unk * oov_scale(partial_len);
          if (lex_->scored()) score += cfg_.alpha * lex_->unk();
        }
      } else if (lm_ && lm_node < 0) {
        score += cfg_.unk_offset * oov_scale(partial_len);
      }
    }
    return {lm_score, state, std::move(partial), partial_len, lm_node, lex_node, hw, words, score};
  }

  // The LM score after word `w`; NEG where lexicon mode forbids it.
  void word(double& lm_score, int& state, const std::string& w, int lm_node,
            int lex_node) const {
    const bool hot = trie_.present && trie_.words.count(w);
    if (lex_ && !hot && !lex_->terminal(lex_node)) {
      if (!cfg_.has_lexicon_unk) {
        lm_score = NEG;
        return;
      }
      lm_score += cfg_.lexicon_unk;
    }
    if (!lm_) return;
    const bool known = lm_->terminal(lm_node);
    auto r = lm_->score(state, known ? lm_node : -1, w);  // unknown words score as <unk>
    state = r.second;
    lm_score += cfg_.alpha * r.first + cfg_.beta;
    if (!lex_ && !known && !hot) lm_score += cfg_.unk_offset;
  }

  // `lex_after`: the lexicon node after `tok`, when the caller has walked
  // there already (lex_after() below), else kUnwalked.
  Ctx extend(const Ctx& c, int tok, int lex_after = kUnwalked) const {
    double lm_score = c.lm_score;
    int state = c.lm_state, words = c.words, partial_len = c.partial_len;
    int lm_node = c.lm_node, lex_node = c.lex_node;
    std::string partial = c.partial;
    HW hw = c.hw;
    if (starts_[tok] && !partial.empty()) {
      word(lm_score, state, partial, lm_node, lex_node);
      if (lm_score == NEG) return {NEG, state, "", 0, 0, 0, hw, words, NEG};  // forbidden word
      words += 1;
      partial.clear();
      partial_len = 0;
      lm_node = 0;
      lex_node = 0;
      if (trie_.present) hw = hw_word_end(hw);
    }
    const bool walk_lex = lex_ && lex_after == kUnwalked;
    const bool walk_lm = lm_ && !same_trie_;
    for (const auto& ch : chars_[tok]) {
      if (trie_.present) hw = hw_char(hw, ch, partial.empty());
      partial += ch;
      ++partial_len;
      if (walk_lm) lm_node = lm_->walk(lm_node, ch);
      if (walk_lex) lex_node = lex_->walk(lex_node, ch);
    }
    if (lex_ && !walk_lex) lex_node = lex_after;
    if (same_trie_) lm_node = lex_node;
    return make_ctx(lm_score, state, std::move(partial), partial_len, lm_node, lex_node, hw,
                    words);
  }

  // Whether the last word was left out (`lenient`: a word lexicon mode
  // forbids is dropped, not scored NEG).
  bool final_context(const Ctx& c, bool lenient, double& lm_score, HW& hw) const {
    lm_score = c.lm_score;
    int state = c.lm_state;
    hw = c.hw;
    bool dropped = false;
    if (!c.partial.empty()) {
      double score = lm_score;
      int after = state;
      word(score, after, c.partial, c.lm_node, c.lex_node);
      if (score == NEG && lenient) {
        dropped = true;
      } else {
        lm_score = score;
        state = after;
        if (trie_.present) hw = hw_word_end(hw);
      }
    }
    if (lm_) lm_score += cfg_.alpha * lm_->score_end(state).first;
    if (trie_.present) hw = hw_finish(hw);
    return dropped;
  }

  // -- frames (BeamSearch._frame / _select) -----------------------------------
  // Hypotheses of the next frame, in first-touch order (Python's dict order).
  // An existing prefix is found through node_slot_, a new one (beam b + tok)
  // through new_slot_: flat arrays instead of hashing every extension.
  struct Entry {
    int node;    // existing node, or -1 for a new prefix
    int parent;  // new prefix: the beam's node
    int tok;     // new prefix: the token appended
    int lex;     // new prefix: its lexicon node if known, else kUnwalked
    double pb, pnb;
  };

  void acc_node(int node, double pb, double pnb) {
    int& slot = node_slot_[node];
    if (slot < 0) {
      slot = static_cast<int>(entries_.size());
      entries_.push_back({node, -1, -1, kUnwalked, pb, pnb});
    } else {
      Entry& e = entries_[slot];
      e.pb = logaddexp(e.pb, pb);
      e.pnb = logaddexp(e.pnb, pnb);
    }
  }

  void acc_new(size_t beam, int64_t V, int parent, int tok, int lex, double pb, double pnb) {
    int& slot = new_slot_[beam * V + tok];
    if (slot < 0) {
      slot = static_cast<int>(entries_.size());
      entries_.push_back({-1, parent, tok, lex, pb, pnb});
    } else {
      Entry& e = entries_[slot];
      e.pb = logaddexp(e.pb, pb);
      e.pnb = logaddexp(e.pnb, pnb);
    }
  }

  // The lexicon node of prefix + tok, or kBlocked where lexicon mode without
  // hotwords or an unk allowance forbids it: it completes a word outside the
  // lexicon, or spells the start of none (extend() would score it NEG).
  int lex_after(const Ctx& c, int tok) const {
    int node = c.lex_node;
    if (starts_[tok] && !c.partial.empty()) {
      if (!lex_->terminal(node)) return kBlocked;
      node = 0;
    }
    for (const auto& ch : chars_[tok]) {
      node = lex_->walk(node, ch);
      if (node < 0) return kBlocked;
    }
    return node;
  }

  void move_peak(int node, double lp) {
    logp_[node] = lp;
    frame_[node] = frames_;
  }

  void candidates(const std::vector<double>& row, std::vector<int>& out) const {
    out.clear();
    const int V = static_cast<int>(row.size());
    for (int i = 0; i < V; ++i)
      if (row[i] >= cfg_.token_min_logp && i != blank_) out.push_back(i);
    if (static_cast<int>(out.size()) > cfg_.top_k) {
      std::stable_sort(out.begin(), out.end(), [&](int a, int b) { return -row[a] < -row[b]; });
      out.resize(cfg_.top_k);
      std::sort(out.begin(), out.end());
    }
  }

  void frame(const std::vector<double>& row) {
    const double blank_lp = row[blank_];
    if (cfg_.has_blank_skip && blank_lp >= cfg_.blank_skip_logp) {
      for (auto& b : beams_) {
        b.pb = logaddexp(b.pb, b.pnb) + blank_lp;
        b.pnb = NEG;
      }
      return;
    }
    const int64_t V = static_cast<int64_t>(row.size());
    candidates(row, cands_);
    entries_.clear();
    if (node_slot_.size() < parent_.size()) node_slot_.resize(parent_.size(), -1);
    if (new_slot_.size() < beams_.size() * V) new_slot_.resize(beams_.size() * V, -1);
    for (size_t bi = 0; bi < beams_.size(); ++bi) {
      const Beam& b = beams_[bi];
      const double total = logaddexp(b.pb, b.pnb);
      acc_node(b.node, total + blank_lp, NEG);
      const int last = token_[b.node];
      const bool boundary = ctx_[b.node].partial.empty();
      for (int tok : cands_) {
        const double lp = row[tok];
        if (boundary && starts_[tok] && chars_[tok].empty()) {
          acc_node(b.node, NEG, total + lp);  // a delimiter with no word open: same prefix
          continue;
        }
        // A prefix lexicon mode forbids is never created (search.py skips it
        // in _select, after scoring it; the same hypotheses survive).
        const int lex = lex_strict_ ? lex_after(ctx_[b.node], tok) : kUnwalked;
        const bool blocked = lex == kBlocked;
        const int child = blocked ? -1 : children_.find(static_cast<int64_t>(b.node) * V + tok);
        if (tok == last) {
          acc_node(b.node, NEG, b.pnb + lp);
          if (lp > logp_[b.node]) move_peak(b.node, lp);
          if (b.pb > NEG && !blocked) {
            if (child >= 0) acc_node(child, NEG, b.pb + lp);
            else acc_new(bi, V, b.node, tok, lex, NEG, b.pb + lp);
          }
        } else if (child >= 0) {
          acc_node(child, NEG, total + lp);
        } else if (!blocked) {
          acc_new(bi, V, b.node, tok, lex, NEG, total + lp);
        }
        if (child >= 0 && lp > logp_[child]) move_peak(child, lp);
      }
    }
    // Reset the slots this frame used.
    for (const Entry& e : entries_) {
      if (e.node >= 0) node_slot_[e.node] = -1;
    }
    for (size_t bi = 0; bi < beams_.size(); ++bi)
      for (int tok : cands_) new_slot_[bi * V + tok] = -1;
    select(row);
  }

  void select(const std::vector<double>& row) {
    scored_.clear();
    pending_.resize(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      double ctx_score;
      if (e.node >= 0) {
        ctx_score = ctx_[e.node].score;
      } else {
        pending_[i] = extend(ctx_[e.parent], e.tok, e.lex);
        ctx_score = pending_[i].score;
        if (ctx_score == NEG) continue;  // lexicon mode: not a word, nor the start of one
      }
      scored_.push_back({logaddexp(e.pb, e.pnb) + ctx_score, i});
    }
    // (score desc, order asc) is a total order, so the partial sort's top
    // `keep` equal a full stable sort's (the Python reference sorts fully).
    const size_t keep = std::min(scored_.size(), static_cast<size_t>(cfg_.beam_width));
    const auto better = [](const Scored& a, const Scored& b) {
      if (a.score != b.score) return a.score > b.score;
      return a.order < b.order;
    };
    if (keep < scored_.size())
      std::nth_element(scored_.begin(), scored_.begin() + keep, scored_.end(), better);
    std::sort(scored_.begin(), scored_.begin() + keep, better);
    const double floor =
        scored_[0].score + (lex_ ? cfg_.lexicon_prune_logp : cfg_.beam_prune_logp);
    std::vector<Beam> beams;
    const int64_t V = static_cast<int64_t>(row.size());
    for (size_t i = 0; i < keep; ++i) {
      if (scored_[i].score < floor) break;
      const Entry& e = entries_[scored_[i].order];
      int node = e.node;
      if (node < 0) {
        node = static_cast<int>(parent_.size());
        children_.insert(static_cast<int64_t>(e.parent) * V + e.tok, node);
        parent_.push_back(e.parent);
        token_.push_back(e.tok);
        frame_.push_back(frames_);
        logp_.push_back(row[e.tok]);
        ctx_.push_back(std::move(pending_[scored_[i].order]));
      }
      beams.push_back({node, e.pb, e.pnb});
    }
    beams_ = std::move(beams);
  }

  int blank_;
  std::vector<bool> starts_;
  std::vector<std::vector<std::string>> chars_;
  std::shared_ptr<LMInfo> lm_;
  std::shared_ptr<WordTrie> lex_;  // lexicon mode only
  bool lex_strict_ = false;        // lexicon mode, no hotwords, no unk allowance
  bool same_trie_ = false;         // the lexicon's trie is the LM vocabulary's
  Trie trie_;
  Config cfg_{};
  std::vector<int> parent_, token_, frame_;
  std::vector<double> logp_;
  std::vector<Ctx> ctx_;
  FlatMap children_;  // parent * V + tok -> node
  std::vector<Beam> beams_;
  int frames_ = 0;
  // Per-frame scratch.
  struct Scored { double score; size_t order; };
  std::vector<int> cands_;
  std::vector<Entry> entries_;
  std::vector<int> node_slot_, new_slot_;
  std::vector<Ctx> pending_;
  std::vector<Scored> scored_;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Compiled core of dsstream's CTC prefix beam search";
  py::class_<LMInfo, std::shared_ptr<LMInfo>>(m, "LMInfo")
      .def(py::init<py::object, const std::vector<std::string>&, int>())
      .def_property_readonly("direct", &LMInfo::direct)
      .def_property_readonly("lookups", &LMInfo::lookups);
  py::class_<WordTrie, std::shared_ptr<WordTrie>>(m, "WordTrie")
      .def(py::init<const std::vector<std::string>&, const std::vector<double>&, double>(),
           py::arg("words"), py::arg("scores") = std::vector<double>(), py::arg("unk") = 0.0);
  py::class_<Core>(m, "Core")
      .def(py::init<int, std::vector<bool>, std::vector<std::vector<std::string>>, py::dict,
                    std::shared_ptr<LMInfo>, py::object, std::shared_ptr<WordTrie>>(),
           py::arg("blank"), py::arg("starts"), py::arg("chars"), py::arg("config"),
           py::arg("lm").none(true), py::arg("trie").none(true),
           py::arg("lexicon").none(true))
      .def("advance", &Core::advance)
      .def("beams", &Core::beams)
      .def("finish", &Core::finish)
      .def("path_info", &Core::path_info)
      .def("text", &Core::text)
      .def("word_times", &Core::word_times)
      .def("num_nodes", &Core::num_nodes)
      .def_property_readonly("frames", &Core::frames);
}
