"""tokenizer.json files (Hugging Face `tokenizers` format) for byte-level BPE vocabularies.

The engine loads tokenizer.json with the Rust `tokenizers` crate; this module writes it from a
GGUF vocabulary, and derives the 12,288-token vocabulary of generated models from SmolLM2's
merges, so nothing is ever downloaded.
"""

from __future__ import annotations

import json

# llama.cpp's pre-tokenizer names (GGUF `tokenizer.ggml.pre`) and the equivalent HF pipelines.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS = {
    # Every digit on its own, then the GPT-2 split (SmolLM, StarCoder and relatives).
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL]},
    "gpt2": _GPT2_BYTE_LEVEL,
    "default": _GPT2_BYTE_LEVEL,
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]},
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tokenizer_json(tokens: list[str], merges: list[str], special_ids: list[int], pre: str) -> dict:
    """A byte-level BPE tokenizer.json. `tokens` are in byte-level form (as GGUF stores them)."""
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {known}); export from a Hugging Face directory instead")
    specials = set(special_ids)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in sorted(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }


# Special tokens of generated models: ChatML turn markers and an end-of-text token.
GENERATED_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def derive_vocabulary(source_merges: list[str], size: int) -> tuple[list[str], list[str]]:
    """A `size`-token byte-level BPE vocabulary: the special tokens, the 256 byte symbols, then
    the results of the first source merges whose two parts are already in the vocabulary.
    Deterministic for a given merge list."""
    tokens = list(GENERATED_SPECIALS) + [bytes_to_unicode()[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    for merge in source_merges:
        if len(tokens) >= size:
            break
        left, right = merge.split(" ", 1)
        joined = left + right
        if left in known and right in known and joined not in known:
            tokens.append(joined)
            known.add(joined)
            merges.append(merge)
    if len(tokens) < size:
        raise ValueError(f"the source has too few merges to build a {size}-token vocabulary")
    return tokens, merges


def write(path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
