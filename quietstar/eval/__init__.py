"""Evaluation of a Quiet-STaR model (docs/official.md, "Evaluation"): GSM8K and CommonsenseQA zero-shot (the paper's
teacher-forced soft accuracy, and exact match from generation with thoughts), held-out NLL with and
without thoughts by difficulty, and a per-token HTML report. CLI: `python -m quietstar.eval`."""
