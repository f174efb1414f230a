"""lm_eval task YAMLs for the local GSM8K and CommonsenseQA files (`gsm8k_local`, `commonsense_qa_local`), and
the functions that read those files (the YAMLs' `custom_dataset`).

The prompts, targets, metrics, filters and generation settings are lm_eval's own `gsm8k` and
`commonsense_qa` (tests/test_lm_eval.py checks them against the installed lm_eval), so a user with the hub
gets the same numbers from the standard task names. Only the data differs in where it comes from: a jsonl
file, given with lm_eval's `--metadata '{"gsm8k_test": FILE, "gsm8k_train": FILE, "commonsense_qa": FILE}'`
(or the `metadata` of `lm_eval.simple_evaluate`), by default ../shared/data beside a checkout.
"""

from __future__ import annotations

from pathlib import Path

from quietstar.eval.common import SHARED_DATA, DataError, field, read_jsonl

TASKS_DIR = Path(__file__).resolve().parent
DEFAULTS = {"gsm8k_test": "gsm8k/test.jsonl", "gsm8k_train": "gsm8k/train.jsonl",
            "commonsense_qa": "commonsenseqa/dev_rand_split.jsonl"}


def data_file(key: str, metadata: dict) -> Path:
    """The file for `key`: metadata[key], else the default under ../shared/data; a DataError naming the key."""
    given = metadata.get(key)
    path = Path(given).expanduser() if given else SHARED_DATA / DEFAULTS[key]
    if not path.is_file():
        how = f"{key}={given}" if given else f"no {key!r} in --metadata and the default {path}"
        raise DataError(f"{how}: no such file (pass --metadata '{{\"{key}\": \"FILE\"}}')")
    return path


def _dataset(splits: dict):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def gsm8k(**metadata):
    """{"test", "train"} of {"question", "answer"} records (GSM8K's jsonl)."""
    splits = {}
    for split in ("test", "train"):
        path = data_file(f"gsm8k_{split}", metadata)
        splits[split] = [{"question": field(path, n, r, "question"), "answer": field(path, n, r, "answer")}
                         for n, r in read_jsonl(path)]
    return _dataset(splits)


def commonsense_qa(**metadata):
    """{"validation"} of CommonsenseQA records in the Hugging Face layout (the original nested layout, with
    question.stem and choices as a list of {"label", "text"}, is read too)."""
    path = data_file("commonsense_qa", metadata)
    rows = []
    for n, r in read_jsonl(path):
        q, choices = r.get("question"), r.get("choices")
        if isinstance(q, dict):  # the original layout
            q, choices = q.get("stem"), q.get("choices", choices)
        if isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
            choices = {"label": [c.get("label") for c in choices], "text": [c.get("text") for c in choices]}
        if not isinstance(q, str):
            raise DataError(f"{path}:{n}: field 'question' should be a string or an object with 'stem'")
        if not (isinstance(choices, dict) and isinstance(choices.get("text"), list) and len(choices["text"]) == 5):
            raise DataError(f"{path}:{n}: field 'choices' should hold five answer texts")
        key = field(path, n, r, "answerKey")
        if key not in "ABCDE" or len(key) != 1:
            raise DataError(f"{path}:{n}: field 'answerKey' should be one of A-E, got {key!r}")
        rows.append({"id": r.get("id", str(n)), "question": q, "question_concept": r.get("question_concept", ""),
                     "choices": {"label": list(choices.get("label") or "ABCDE"), "text": list(choices["text"])},
                     "answerKey": key})
    return _dataset({"validation": rows})
