"""Tokenizers: the `Tokenizer` wrapper of pretrained models, `ByteTokenizer` for random-init ones, building
a Tokenizer from GGUF metadata or an HF dir's tokenizer.json, and saving / loading one beside a checkpoint.

The thought tokens <|startthought|> and <|endthought|> get ids V and V+1, past the model's vocabulary V
(the embedding is not resized: thinker.py owns their embeddings). They are never registered with the
inner tokenizer, so text that happens to contain those strings encodes as ordinary text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from quietstar.errors import LoadError, MissingFileError
from quietstar.hf_dir import read_json

START_THOUGHT, END_THOUGHT = "<|startthought|>", "<|endthought|>"


class Tokenizer:
    """A `tokenizers.Tokenizer` for the base vocabulary plus the two thought tokens at ids V and V+1.

    vocab_size is the base model's V (rows of its embedding); len(tokenizer) = V + 2. encode() never
    produces a thought id; decode() shows them as <|startthought|> / <|endthought|>.
    """

    def __init__(self, backend, vocab_size: int, bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int] = None, add_bos: bool = False, source: str = ""):
        n = backend.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise LoadError(f"{source}: the tokenizer has {n} tokens, more than the model's vocab_size={vocab_size}")
        self.backend = backend  # the inner tokenizers.Tokenizer (base vocabulary only)
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = add_bos and bos_id is not None  # encode()'s default
        self.start_thought_id, self.end_thought_id = vocab_size, vocab_size + 1
        self.source = source

    def __len__(self) -> int:
        return self.vocab_size + 2

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, add_bos={self.add_bos})")

    def _with_bos(self, ids: list[int], add_bos: Optional[bool]) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] + ids if add and self.bos_id is not None else ids

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """text -> ids; add_bos None = the tokenizer's default (SmolLM2: no BOS)."""
        return self._with_bos(self.backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: Optional[bool] = None) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_thought_tokens: bool = False) -> str:
        """ids -> text, the thought ids written as <|startthought|> / <|endthought|> (or dropped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        marks = {self.start_thought_id: START_THOUGHT, self.end_thought_id: END_THOUGHT}
        parts, run = [], []
        for i in ids:
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is outside the tokenizer's range [0, {len(self)})")
            if i in marks:
                parts.append(self.backend.decode(run, skip_special_tokens=False))
                parts.append("" if skip_thought_tokens else marks[i])
                run = []
            else:
                run.append(i)
        parts.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(parts)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes go to 256, 257, ...
    return dict(zip(bs, map(chr, cs)))


# llama.cpp pre-tokenizer names whose split regex differs from GPT-2's (the byte-level default), as in
# transformers' GGUF conversion; "smollm" (SmolLM2) uses the GPT-2 regex there, and so here.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                   "smaug-bpe": LLAMA3_SPLIT}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def tokenizer_from_gguf(meta: dict, path: Path, vocab_size: Optional[int] = None) -> Tokenizer:
    """Byte-level BPE (tokenizer.ggml.model == "gpt2") from GGUF metadata: vocabulary, merges, control
    tokens matched whole in text (like <|im_start|>), ByteLevel pre-tokenizer and decoder."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LoadError(f"{path}: unsupported GGUF tokenizer {kind!r} (only byte-level BPE, 'gpt2')")
    if "tokenizer.ggml.tokens" not in meta:
        raise LoadError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.tokens'")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = list(meta.get("tokenizer.ggml.merges", []))  # gguf's writer omits an empty array
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False, byte_fallback=False)
    except Exception as e:
        raise LoadError(f"{path}: inconsistent tokenizer vocabulary / merges ({e})") from e
    tok = HFTokenizer(bpe)
    split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocab
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == GGUF_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == GGUF_USER_DEFINED and t in vocab])

    def special(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    return Tokenizer(tok, vocab_size or len(tokens), special("bos_token_id"), special("eos_token_id"),
                     special("padding_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token", False)), str(path))


def tokenizer_from_hf_dir(path: Path, vocab_size: Optional[int] = None) -> Tokenizer:
    """tokenizer.json, with bos/eos/pad and add_bos_token from tokenizer_config.json (or config.json)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingFileError(f"{file}: file not found")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise LoadError(f"{file}: not a readable tokenizer.json ({e})") from e
    tcfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    mcfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}

    def special(name):
        t = tcfg.get(f"{name}_token")
        t = t.get("content") if isinstance(t, dict) else t
        i = tok.token_to_id(t) if isinstance(t, str) else None
        if i is None:
            i = mcfg.get(f"{name}_token_id")
            i = i[0] if isinstance(i, list) else i
        return i

    bos = special("bos")
    probe = tok.encode("", add_special_tokens=True).ids  # does the post-processor prepend BOS?
    add_bos = tcfg.get("add_bos_token", bos is not None and probe[:1] == [bos])
    vocab_size = vocab_size or mcfg.get("vocab_size") or tok.get_vocab_size(with_added_tokens=True)
    return Tokenizer(tok, vocab_size, bos, special("eos"), special("pad"), bool(add_bos), str(path))




# --------------------------------------------------------------------------------------------------
# a byte-level tokenizer for random-init models (the `tiny` preset and friends)


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random-init models (vocab_size >= 256).

    Ids 0, 1, 2 (the control bytes NUL, SOH, STX, dropped from text) serve as pad, BOS and EOS; the
    thought tokens are `vocab_size` and `vocab_size + 1`, past the model's vocabulary, as thinker.py expects.
    """

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 256:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 256, got {vocab_size}")
        self.vocab_size = vocab_size
        self.start_thought_id, self.end_thought_id = vocab_size, vocab_size + 1

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b for b in text.encode("utf-8") if b > 2]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 2 < int(i) < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# beside a checkpoint: tokenizer.json + tokenizer_config.json


def _write_config(out: Path, obj: dict) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (HF layout) for a Tokenizer, or a marker for bytes."""
    if isinstance(tok, ByteTokenizer):
        _write_config(out, {"quietstar_tokenizer": "byte", "vocab_size": tok.vocab_size})
        return
    backend = getattr(tok, "backend", None)
    if backend is None:
        return
    backend.save(str(out / "tokenizer.json"))
    name = lambda i: None if i is None else backend.id_to_token(int(i))  # noqa: E731
    _write_config(out, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
        "pad_token": name(tok.pad_id), "add_bos_token": bool(getattr(tok, "add_bos", False)),
        "model_max_length": 1 << 30})


def load_tokenizer_from(path: Path, vocab_size: int):
    """The tokenizer saved by `save_tokenizer` (None if there is none)."""
    path = Path(path)
    tcfg = path / "tokenizer_config.json"
    if tcfg.is_file():
        meta = json.loads(tcfg.read_text())
        if meta.get("quietstar_tokenizer") == "byte":
            return ByteTokenizer(int(meta.get("vocab_size", vocab_size)))
    if (path / "tokenizer.json").is_file():
        return tokenizer_from_hf_dir(path, vocab_size)
    return None
