"""Golden data for tests/models/test_tokenizer.cpp and tests/models/test_chat_template.cpp.

References: HF `tokenizers` (encode / decode), Python's `unicodedata` (NFC) and jinja2 through
transformers' chat-template renderer (the environment `apply_chat_template` uses).

Writes under --out:
  corpus.json                 texts encoded by every tokenizer
  <name>/tokenizer.json       the tokenizers under test:
      smollm2        <model-dir>/tokenizer.json (made by `kvdistill convert`), copied
      gpt2_style     BPE trained here: ByteLevel(add_prefix_space) pre-tokenizer, "a b" merges,
                     special / lstrip / rstrip / single_word added tokens
      llama3_style   Split(Llama-3 regex) + ByteLevel(use_regex=false), ignore_merges,
                     TemplateProcessing adding <|begin_of_text|>, special tokens after the vocabulary
      qwen2_style    NFC normalizer, Split(Qwen2 regex) + ByteLevel(use_regex=false), normalized
                     added tokens
      split_variants the gpt2_style model under every Split behaviour, invert, Digits(contiguous),
                     Sequence[NFC], no decoder
      smollm2_unk    smollm2 with unk_token and fuse_unk (its vocabulary lacks a few control bytes)
  golden.json                 per tokenizer: ids (AddSpecial No / Yes) and decodes of every text,
                              decodes of random id sequences, a sample of id -> token
  big.txt, big_ids.json       ~1 MB of mixed text and its ids under smollm2 / llama3_style / qwen2_style
  nfc.json                    NFC of single code points and of random combining sequences
  chat/                       chat templates (tokenizer_config.json per template) and renders:
                              SmolLM2's from the GGUF (and <model-dir>/tokenizer_config.json when
                              present), and the public Qwen2.5, Qwen3, Llama-3.0 and Llama-3.2
                              templates written out below (Llama-3.1 style = 3.2 with a fixed date)
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

# A word kept out of the training data: llama3_style gets it as a vocabulary entry that no sequence of
# merges produces, so that ignore_merges decides its encoding.
UNTRAINED_WORD = "qwertzuiop"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PROSE = (
    "The quick brown fox jumps over the lazy dog. It wasn't the first time; the dog's owner had seen it "
    "happen before, and she'd probably see it again. We've all been there, haven't we? They'll say it's "
    "nothing, but I'm not so sure. Distillation trains a small module against a frozen model: the teacher "
    "provides the targets and the student learns which cached tokens matter for the answer."
)
PYTHON = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])   # trailing spaces follow   
    return out[:n]


if __name__ == "__main__":
\tprint(fibonacci(10))  # {'a': 1, "b": [2, 3]}
'''
CPP = '''#include <vector>
template <typename T>
std::vector<T> scale(const std::vector<T>& v, T k) {
\tstd::vector<T> r; r.reserve(v.size());
\tfor (auto x : v) r.push_back(x * k);  // 0x1F, 1e-6, 3.14f
\treturn r;
}
'''


def corpus_texts():
    t = [
        "", " ", "a", "Hello world", "Hello, world!", "  leading spaces", "trailing spaces   ",
        "\t\ttabs\tand\ttext\t", "a\n\n\nb", "line one\r\nline two\r\n", "end with newline\n",
        "   \n  \n", "     ", "\n", "word \n next", "many     inner      spaces",
        PROSE, PYTHON, CPP,
        "I'm, you're, he's, don't, we've, they'll, I'd.", "I'M YOU'RE HE'S DON'T WE'VE THEY'LL I'D",
        "it's 'quoted' and ''double'' ' 's 'S 't 'ſ x'ſ", "rock'n'roll o'clock",
        "1234567890", "3.14159265358979", "In 2024, 10,000,000 people; 007 agents; 1e10; 0x7F",
        "٣٤٥ ١٢ ²³ ½ Ⅷ 𝟙𝟚", "phone: +1 (555) 123-4567",
        "中文文本测试：我们正在测试分词器。", "日本語のテキスト、ひらがなとカタカナ。", "한국어 텍스트 테스트입니다.",
        "Ελληνικά κείμενα", "Русский текст, ёлка", "עִבְרִית", "العربية النص", "हिन्दी पाठ", "ภาษาไทย",
        "Tiếng Việt có dấu", "naïve café résumé coöperate façade", "Straße ẞ ß",
        "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ zwj 🧑🏻‍💻", "😀😃😄😁", "🤖 ✨ ⭐️",
        # combining sequences and text that NFC changes
        "e\u0301 a\u0300 o\u0308 n\u0303", "\u212b \u2126 \u00c5", "A\u030a\u0323 q\u0307\u0323 q\u0323\u0307",
        unicodedata.normalize("NFD", "Tiếng Việt naïve café 한국어 텍스트"), "\u1100\u1161\u11a8 \u1100\u1161",
        "\u0915\u093c \u0958", "x\u0338 \u2260", "\u0344 \u0f73 \u0f75",
        # whitespace zoo
        "nbsp\u00a0here", "ideographic\u3000space", "nel\u0085char", "line\u2028sep\u2029para",
        "mongolian\u180evowel", "zero\u200bwidth", "bom\ufeffinside", "vt\x0bff\x0cfs\x1cgs\x1d",
        "thin\u2009space\u202fnarrow", "mixed \t\u00a0 \n\u3000 end",
        "\x04\x06\x13\x14\x16\x1d x\x1d\x1d y\x1dz",
        # special tokens in text
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "abc<|endoftext|>def", "<|endoftext|><|endoftext|>", "<|im_start|<|im_end|", "<|im_start",
        " <|endoftext|> spaced ", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "x<|eot_id|>", "<pad> <pad><pad>",
        "Use [MASK] here and[MASK]there  [MASK]  done", "<tool> call <tool>s mytool <tool>_x é<tool>é",
        "tool tools toolkit a_tool tool. (tool)", "\u212bngstr\u00f6m \u00c5ngstr\u00f6m Angstrom",
        # structured text
        "https://example.com/path?q=1&lang=en#frag user@example.org",
        '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
        "| col1 | col2 |\n|------|------|\n| **bold** | `code` |",
        "=" * 100, "a" * 300, "b" * 5000, " " * 3000 + "x" + "\n" * 1000 + "\t" * 500, "ab" * 150 + " " + "xyz" * 90, " " * 50 + "x", "\n" * 7,
        "qwertzuiop plugh qwertzuiopqwertzuiop", " qwertzuiop", "x qwertzuiop.",
    ]
    rng = random.Random(1234)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " \t\n\r", ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "éèêëàâäîïôöùûüçñÅåØøÆæ", "\u0300\u0301\u0302\u0303\u0308\u030a\u0323\u0327\u0338\u05b4\u0651",
        "中文日本語한국어テスト", "😀👍🏽\u200d❤️🇫🇷", "\u00a0\u3000\u2028\u0085\u180e",
        "ſ'stremvld",
    ]
    for _ in range(60):
        n = rng.randint(1, 40)
        t.append("".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    return t


def training_corpus(texts):
    rng = random.Random(99)
    words = (PROSE + " " + PYTHON + " " + CPP).split()
    texts = [t for t in texts if UNTRAINED_WORD not in t]
    lines = list(texts)
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))))
    for t in texts:
        lines.append(t * 3)
    return lines


def train_bpe(pre_tokenizer, lines, vocab_size, special_tokens, ignore_merges=False, normalizer=None):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def with_json(tok, edit):
    j = json.loads(tok.to_str())
    edit(j)
    return json.dumps(j, ensure_ascii=False)


def build_tokenizers(model_dir, texts, out):
    files = {}  # name -> tokenizer.json text
    smol = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(smol):
        sys.exit(f"tokenizer_golden: {smol} is missing: convert the GGUF first "
                 f"(`kvdistill convert`, run by scripts/bootstrap.sh)")

    lines = training_corpus(texts)

    # GPT-2 style: ByteLevel pre-tokenizer with its own regex, add_prefix_space, merges as "a b".
    gpt2 = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True), lines, 1500,
                     ["<|endoftext|>", "<pad>"])
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    gpt2.add_tokens([AddedToken("<tool>", single_word=True, normalized=False),
                     AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False, special=True)])
    # Saved with merges as "a b" strings (the older format); tokenizers reads both.
    files["gpt2_style"] = with_json(gpt2, lambda j: j["model"].update(
        merges=[" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]))

    # Llama-3 style: Split + ByteLevel(use_regex=False), ignore_merges, BOS template, special tokens
    # appended after the vocabulary; "Ġ" + UNTRAINED_WORD is a vocabulary entry no merges produce.
    llama = train_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), lines, 2000, [],
        ignore_merges=True)

    def add_word(j):
        v = j["model"]["vocab"]
        assert "Ġ" + UNTRAINED_WORD not in v
        v["Ġ" + UNTRAINED_WORD] = len(v)
    llama = Tokenizer.from_str(with_json(llama, add_word))
    llama.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                              ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                               "<|end_header_id|>", "<|eot_id|>"]])
    bos = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    files["llama3_style"] = llama.to_str()

    # Qwen2 style: NFC normalizer, Split + ByteLevel(use_regex=False), normalized added tokens.
    qwen = train_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), lines, 2000,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    qwen.add_tokens([AddedToken("\u212bngstr\u00f6m", normalized=True),
                     AddedToken("tool", single_word=True, normalized=True),
                     AddedToken("[MASK]", lstrip=True, normalized=True)])
    files["qwen2_style"] = qwen.to_str()

    # Every Split behaviour on the gpt2_style model.
    variants = pre_tokenizers.Sequence([
        pre_tokenizers.Split(",", behavior="removed"),
        pre_tokenizers.Split(Regex(r"\d+"), behavior="merged_with_previous"),
        pre_tokenizers.Split("-", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[aeiou]"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_previous", invert=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    sv = Tokenizer.from_str(gpt2.to_str())
    sv.pre_tokenizer = variants
    sv.normalizer = normalizers.Sequence([normalizers.NFC()])
    files["split_variants"] = with_json(sv, lambda j: j.update(decoder=None))

    # SmolLM2 with an unk token: the control bytes its vocabulary lacks become fused <|endoftext|>.
    with open(smol, encoding="utf-8") as f:
        j = json.load(f)
    j["model"].update(unk_token="<|endoftext|>", fuse_unk=True)
    files["smollm2_unk"] = json.dumps(j, ensure_ascii=False)

    toks = {}
    for name in ["smollm2"] + list(files):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        dst = os.path.join(out, name, "tokenizer.json")
        if name == "smollm2":
            shutil.copyfile(smol, dst)
        else:
            with open(dst, "w", encoding="utf-8") as f:
                f.write(files[name])
        toks[name] = Tokenizer.from_file(dst)  # the reference is exactly the file under test
    return toks


def big_text(texts, toks):
    """~1 MB of the corpus texts that all of `toks` decode back to themselves (NFC for qwen2_style)."""
    def round_trips(t):
        return all(tok.decode(tok.encode(t, add_special_tokens=False).ids) ==
                   (unicodedata.normalize("NFC", t) if name == "qwen2_style" else t)
                   for name, tok in toks.items())
    rng = random.Random(7)
    parts, size = [], 0
    pool = [t for t in texts if t and round_trips(t)] + [PROSE] * 20 + [PYTHON] * 5 + [CPP] * 5
    while size < 1_000_000:
        t = rng.choice(pool)
        parts.append(t)
        size += len(t.encode("utf-8"))
    return "\n".join(parts)


def golden_for(tok, texts, path):
    rng = random.Random(42)
    n = tok.get_vocab_size(with_added_tokens=True)
    cases = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        ids_sp = tok.encode(t, add_special_tokens=True).ids
        cases.append({"ids": ids, "ids_special": ids_sp,
                      "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    added = sorted(tok.get_added_tokens_decoder().items())
    decode_cases = []
    for _ in range(200):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        if added and rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(added)[0])
        decode_cases.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False),
                             "text_skip": tok.decode(ids, skip_special_tokens=True)})
    sample = sorted(set(rng.randrange(n) for _ in range(300)) | {i for i, _ in added})
    tokens = [{"id": i, "token": tok.id_to_token(i)} for i in sample]
    specials = [{"id": i, "content": a.content, "special": a.special} for i, a in added]
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"vocab_size": n, "sha256": sha, "cases": cases, "decode_cases": decode_cases, "tokens": tokens,
            "added": specials}


def nfc_cases():
    rng = random.Random(5)
    singles = []
    interesting = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if unicodedata.combining(c) or unicodedata.decomposition(c) or 0xAC00 <= cp <= 0xD7A3 or \
                0x1100 <= cp <= 0x11FF:
            interesting.append(c)
    # Every interesting code point alone, and after a base letter, in chunks of 64.
    for i in range(0, len(interesting), 64):
        chunk = interesting[i:i + 64]
        s = "".join(chunk)
        singles.append(s)
        singles.append("".join("a" + c for c in chunk))
    marks = [c for c in interesting if unicodedata.combining(c)]
    bases = list("aeiouAEIOUnNcCsSzZ") + [chr(c) for c in range(0x1100, 0x1113)] + \
        [chr(c) for c in range(0x1161, 0x1176)] + [chr(c) for c in range(0x11A8, 0x11C3)] + \
        list("\u0915\u0928\u09c7\u0b47\u0bc6\u0cc6\u0d46\u0dd9\u1025\u1b05") + \
        ["\u00c5", "\u212b", "\u1e0a", "\u0227", "\u01b7", "\u03b1", "\u0430"]
    tails = marks[:200] + list("\u0300\u0301\u0302\u0308\u030a\u0323\u0327\u0345\u093c\u09be\u09d7"
                               "\u0b3e\u0b56\u0b57\u0bbe\u0bd7\u0cc2\u0cd5\u0cd6\u0d3e\u0d57\u0dca"
                               "\u0dcf\u0ddf\u102e\u1b35\u3099\u309a")
    randoms = []
    for _ in range(3000):
        s = "".join(rng.choice(bases) + "".join(rng.choice(tails) for _ in range(rng.randint(0, 4)))
                    for _ in range(rng.randint(1, 6)))
        randoms.append(s)
    for _ in range(300):
        s = "".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randint(1, 5)))
        randoms.append(unicodedata.normalize("NFD", s))
    return [{"in": s, "out": unicodedata.normalize("NFC", s)} for s in singles + randoms]


# --- chat templates ------------------------------------------------------------------------------

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
                   " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Llama-3.1 style: a fixed date instead of strftime_now.
LLAMA31_TEMPLATE = LLAMA32_TEMPLATE.replace(
    """    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}""", """    {%- set date_string = "26 Jul 2024" %}""")
assert LLAMA31_TEMPLATE != LLAMA32_TEMPLATE

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"},
     {"role": "assistant", "content": "Four"}],
    [{"role": "user", "content": "  padded content\twith tabs \n\n"},
     {"role": "assistant", "content": "\nUnicode: 日本語 👍🏽 e\u0301 <|im_end|> {{ not jinja }}\n"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "first"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "second"}],
    [{"role": "user", "content": "Solve it"},
     {"role": "assistant", "content": "<think>\nsome reasoning\n</think>\n\nThe answer is 4."},
     {"role": "user", "content": "Again"},
     {"role": "assistant", "content": "<think>\n\nmore\n\n</think>\n\n\nFinal."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain answer"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
     {"role": "assistant", "content": "reasoning only</think>answer"}],
]


def render(template, messages, add_generation_prompt, bos, eos):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def gguf_chat_template(gguf_path):
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)
    f = r.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    return (f["tokenizer.chat_template"].contents(), tokens[f["tokenizer.ggml.bos_token_id"].contents()],
            tokens[f["tokenizer.ggml.eos_token_id"].contents()])


def chat_goldens(out, gguf_path, model_dir):
    chat_dir = os.path.join(out, "chat")
    templates = []
    tpl, bos, eos = gguf_chat_template(gguf_path)
    templates.append(("smollm2_gguf", tpl, bos, eos, {"bos_token": bos, "eos_token": eos}))
    templates.append(("qwen2.5", QWEN25_TEMPLATE, None, "<|im_end|>",
                      {"bos_token": None, "eos_token": "<|im_end|>"}))
    templates.append(("qwen3", QWEN3_TEMPLATE, None, "<|im_end|>",
                      {"bos_token": None, "eos_token": {"content": "<|im_end|>", "lstrip": False,
                                                        "normalized": False, "rstrip": False,
                                                        "single_word": False}}))
    templates.append(("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    templates.append(("llama3.1", LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    templates.append(("llama3.2", LLAMA32_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    model_cfg = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(model_cfg):
        cfg = json.load(open(model_cfg, encoding="utf-8"))
        if isinstance(cfg.get("chat_template"), str):
            def content(v):
                return v.get("content") if isinstance(v, dict) else v
            templates.append(("smollm2_model_dir", cfg["chat_template"], content(cfg.get("bos_token")),
                              content(cfg.get("eos_token")), None))
    result = []
    today = datetime.datetime.now().strftime("%d %b %Y")
    for name, tpl, bos, eos, cfg in templates:
        if cfg is None:
            cfg_path = model_cfg
        else:
            os.makedirs(os.path.join(chat_dir, name), exist_ok=True)
            cfg_path = os.path.join(chat_dir, name, "tokenizer_config.json")
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(dict(cfg, chat_template=tpl), f, ensure_ascii=False, indent=1)
        renders = []
        for i, conv in enumerate(CONVERSATIONS):
            for agp in (False, True):
                renders.append({"conversation": i, "add_generation_prompt": agp,
                                "text": render(tpl, conv, agp, bos, eos)})
        result.append({"name": name, "config": cfg_path, "renders": renders})
    with open(os.path.join(chat_dir, "golden.json"), "w", encoding="utf-8") as f:
        # today: what strftime_now("%d %b %Y") gave the templates that use it (Llama-3.2)
        json.dump({"conversations": CONVERSATIONS, "templates": result, "today": today}, f,
                  ensure_ascii=True, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    texts = corpus_texts()
    chat_goldens(a.out, a.gguf, a.model_dir)
    toks = build_tokenizers(a.model_dir, texts, a.out)

    def dump(name, obj):
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=True)

    dump("corpus.json", texts)
    dump("golden.json", {"tokenizers": {
        name: golden_for(tok, texts, os.path.join(a.out, name, "tokenizer.json")) for name, tok in toks.items()}})
    big_names = ("smollm2", "llama3_style", "qwen2_style")
    big = big_text(texts, {name: toks[name] for name in big_names})
    with open(os.path.join(a.out, "big.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(big)
    dump("big_ids.json", {name: toks[name].encode(big, add_special_tokens=False).ids
                          for name in big_names})
    dump("nfc.json", nfc_cases())
    with open(os.path.join(a.out, "nfc_unicode.txt"), "w") as f:  # the tables of tokenizer.cpp are 14.0.0
        f.write(unicodedata.unidata_version)
    print(f"tokenizer_golden: wrote {len(texts)} texts x {len(toks)} tokenizers, "
          f"{len(big.encode('utf-8'))} bytes of big text to {a.out}")


if __name__ == "__main__":
    main()
