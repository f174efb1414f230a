"""Exact match from generation with thoughts: zero-shot chain of thought with a majority vote
(docs/official.md; the official zero-shot CoT script; Kojima et al. 2022 for the two-stage prompt).

Stage 1: "Q: <question>\\nA: Let's think step by step." is continued by sampling (temperature 0.9 in
the official run) with thoughts (generate.generate_stream: the last position thinks before each token).
A row stops at EOS / BOS / pad (and the model's other end-of-text tokens), or once "Q:" or "\\n\\n\\n"
appears twice in the text, which is then cut before the last occurrence (the official code meant
`end_str.join(parts[:-1])`; it passed a list to the tokenizer instead), or after
max_cot_tokens (the official 384; smaller here to fit a CPU budget, recorded in the json).
Stage 2: "\\nTherefore, the answer (arabic numerals) is" is appended to the right-stripped text and at most
answer_tokens (12) more tokens are generated. The answer is the first integer after that phrase
(commas removed, no sign, no decimals, as in the official code); k samples per question are combined by
a majority vote (Counter.most_common, so a tie goes to the first answer seen; None is a candidate).
The CommonsenseQA variant appends "\\nTherefore, among A through E, the answer is" and takes the first
letter A-E.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional, Sequence

import torch

from quietstar.eval.common import Progress
from quietstar.generate import encode_prompt, generate_stream, left_pad
from quietstar.methods.quietstar.thinker import QuietStar

COT_PROMPT = "\nA: Let's think step by step."
GSM8K_FINAL = "\nTherefore, the answer (arabic numerals) is"
CSQA_FINAL = "\nTherefore, among A through E, the answer is"
END_STRINGS = ("Q:", "\n\n\n")


def first_integer(text: str) -> Optional[int]:
    """The official extract_first_integer: first run of digits after removing commas."""
    m = re.search(r"\d+", text.replace(",", ""))
    return int(m.group()) if m else None


def first_letter(text: str) -> Optional[str]:
    m = re.search(r"[A-E]", text)
    return m.group() if m else None


def stop_token_ids(tok) -> list[int]:
    """EOS, BOS and pad (the official rule), plus end-of-text specials the tokenizer knows as one token."""
    ids = {i for i in (tok.eos_id, tok.bos_id, tok.pad_id) if i is not None}
    for s in ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>"):
        enc = tok.encode(s, add_bos=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


def cut_at_end_string(text: str) -> Optional[str]:
    """If "Q:" or "\\n\\n\\n" occurs twice, the text before the last occurrence of the first such string."""
    for end in END_STRINGS:
        if text.count(end) > 1:
            return text[:text.rfind(end)]
    return None


@torch.no_grad()
def _continue(qs: QuietStar, tok, texts: Sequence[str], max_new: int, temperature: float, think: bool,
              generator, stop_ids, check_text: bool) -> list[str]:
    """Continue each text; returns the full texts (prompt + continuation), cut by the stop rules."""
    dev = qs.model.tok_embeddings.weight.device
    prompts = [encode_prompt(tok, t) for t in texts]  # BOS first, as in training
    ids, mask = left_pad(prompts, tok.pad_id, dev)
    gen = [[] for _ in texts]
    done = [False] * len(texts)
    out = list(texts)
    for step in generate_stream(qs, ids, mask, max_new_tokens=max_new, temperature=temperature, think=think,
                                generator=generator, stop_ids=stop_ids, pad_id=tok.pad_id):
        for b in range(len(texts)):
            if done[b]:
                continue
            t = int(step.tokens[b])
            if t in stop_ids:
                done[b] = True
                continue
            gen[b].append(t)
            out[b] = texts[b] + tok.decode(gen[b])
            if check_text:
                cut = cut_at_end_string(out[b])
                if cut is not None:
                    out[b], done[b] = cut, True
        if all(done):
            break
    return out


@torch.no_grad()
def zero_shot_cot(qs: QuietStar, tok, questions: Sequence[str], golds: Sequence, k: int = 1,
                  temperature: float = 0.9, think: bool = True, max_cot_tokens: int = 128,
                  answer_tokens: int = 12, final_text: str = GSM8K_FINAL,
                  extract: Callable[[str], object] = first_integer, batch_size: int = 8,
                  generator: Optional[torch.Generator] = None, desc: str = "cot") -> dict:
    """-> {"em", "items": [{votes, voted, gold, correct, sample}]}; batch_size counts generated rows
    (questions x k)."""
    stop_ids = stop_token_ids(tok)
    per_batch = max(1, batch_size // k)
    items = []
    bar = Progress(len(questions), desc)
    for q0 in range(0, len(questions), per_batch):
        qs_batch = questions[q0:q0 + per_batch]
        prompts = [f"Q: {q}{COT_PROMPT}" for q in qs_batch for _ in range(k)]
        reasoned = _continue(qs, tok, prompts, max_cot_tokens, temperature, think, generator, stop_ids, True)
        finals = [t.rstrip() + final_text for t in reasoned]
        answered = _continue(qs, tok, finals, answer_tokens, temperature, think, generator, stop_ids, False)
        for j, gold in enumerate(golds[q0:q0 + per_batch]):
            texts = answered[j * k:(j + 1) * k]
            votes = [extract(t.split(final_text)[-1]) for t in texts]
            voted = Counter(votes).most_common(1)[0][0]
            items.append({"votes": votes, "voted": voted, "gold": gold, "correct": voted == gold,
                          "sample": texts[0][len(f"Q: {qs_batch[j]}"):]})
        bar.update(len(qs_batch), f"em {sum(i['correct'] for i in items) / len(items):.3f}")
    bar.close()
    return {"em": sum(i["correct"] for i in items) / len(items), "n": len(items), "k": k,
            "temperature": temperature, "max_cot_tokens": max_cot_tokens, "answer_tokens": answer_tokens,
            "final_text": final_text, "think": think, "stop_ids": stop_ids, "items": items}
