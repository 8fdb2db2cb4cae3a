#!/usr/bin/env python3
"""Check a converted tokenizer against transformers' own GGUF tokenizer.

    check-tokenizer.py MODEL.gguf CONVERTED_DIR

Loads the GGUF with transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), and the
converted `tokenizer.json` with the `tokenizers` library alone, then compares the ids (and the
decoded text) over a set of tricky strings. Also checks transformers on the converted directory.
Exits non-zero on any mismatch. Needs transformers, gguf and tokenizers (e.g. /opt/refenv).
"""

import json
import os
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

CASES = [
    "",
    " ",
    "Hello, world!",
    "hello <|im_start|> world",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_end|>x<|endoftext|>",
    "<|im_start|",  # an incomplete special token is plain text
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\n\n\nand newlines\r\n",
    "\t\t\n \n",
    "12345678901234567890 3.14159 1,000,000 0x1F",
    "中文测试，你好世界。日本語のテキスト。한국어",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷",
    "combining: e\u0301 a\u0300 n\u0303 \u0915\u094d\u0937",
    "Ünïcödé façade naïve coöperate",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "fn main() { println!(\"{}\", x?); }",
    "it's I'm we'll they've she'd don't",
    "<repo_name>farsight<file_sep>src/main.rs",
    "\u00a0non-breaking\u2009thin\u3000ideographic space",
    "zero\u200bwidth\ufeffbom",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    gguf, out_dir = sys.argv[1], sys.argv[2]
    ref = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf))
    ours = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    hf_dir = AutoTokenizer.from_pretrained(out_dir)
    failures = 0
    for text in CASES:
        want = ref(text, add_special_tokens=True).input_ids
        got = ours.encode(text, add_special_tokens=True).ids
        via_dir = hf_dir(text, add_special_tokens=True).input_ids
        dec_want = ref.decode(want)
        dec_got = ours.decode(got, skip_special_tokens=False)
        ok = want == got == via_dir and dec_want == dec_got
        if not ok:
            failures += 1
            print(f"MISMATCH {text!r}\n  transformers(gguf) {want}\n  tokenizers(ours)   {got}\n"
                  f"  transformers(dir)  {via_dir}\n  decoded {dec_want!r} vs {dec_got!r}")
    # The special tokens and the chat template as transformers sees them.
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(ref, attr) != getattr(hf_dir, attr):
            failures += 1
            print(f"MISMATCH {attr}: {getattr(ref, attr)!r} vs {getattr(hf_dir, attr)!r}")
    if ref.chat_template != hf_dir.chat_template:
        failures += 1
        print("MISMATCH chat_template")
    msgs = [{"role": "user", "content": "Hi there"}]
    text_a = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text_b = hf_dir.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    a, b = ref(text_a).input_ids, ours.encode(text_b).ids
    if text_a != text_b or a != b:
        failures += 1
        print(f"MISMATCH chat template ids {a} vs {b}")
    # Structural comparison with the tokenizer.json transformers builds itself.
    ref_json = json.loads(ref.backend_tokenizer.to_str())
    our_json = json.loads(ours.to_str())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if ref_json[key] != our_json[key]:
            failures += 1
            print(f"MISMATCH tokenizer.json[{key!r}]:\n  {ref_json[key]}\n  {our_json[key]}")
    for key in ("vocab", "merges", "type", "byte_fallback", "unk_token"):
        if ref_json["model"].get(key) != our_json["model"].get(key):
            failures += 1
            print(f"MISMATCH tokenizer.json['model'][{key!r}]")
    total = len(CASES)
    print(f"{total - min(failures, total)}/{total} strings identical; {failures} mismatch(es) in total")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
