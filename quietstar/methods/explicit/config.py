"""The explicit-thinking recipe's settings (TrainConfig.explicit; configs/explicit/*.yaml set them per method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from quietstar.errors import ConfigError
from quietstar.methods.explicit.losses import PREFERENCE_LOSSES

METHODS = ("star", "rft", "system2", "vstar", "tpo", "cpo", "cai")
TASKS = ("reasoning", "gsm8k")
JUDGES = ("answer", "model", "choice")
SELF_EVALS = ("agreement", "likelihood", "model", "answer")
VERIFIER_SCORES = ("ratio", "likelihood")


@dataclass
class ExplicitConfig:
    method: str = "star"
    """star (Zelikman et al. 2022) | rft (rejection-sampling fine-tuning) | system2 (System-2 distillation,
    Yu et al. 2024); docs/explicit.md. The preference-based ones (docs/explicit_preference.md): vstar (a STaR
    generator and a DPO verifier for best-of-k, Hosseini et al. 2024) | tpo (thought preference optimisation,
    Wu et al. 2024) | cpo (chain of preference optimisation over a tree search, Zhang et al. 2024) | cai
    (Constitutional AI: SFT on the model's own critiqued revisions, then preference pairs it labels itself,
    Bai et al. 2022; explicit/constitutional.py)."""
    task: str = "reasoning"
    """What the questions are: reasoning (the reasoning corpus's queries, data.reasoning) | gsm8k (grade-school
    math word problems from gsm8k_dir, a pretrained model as the base; explicit/tasks.py gsm8k_splits)."""
    gsm8k_dir: str = "../shared/data/gsm8k"
    """task=gsm8k: the directory of train.jsonl (training, validation and worked-example problems) and test.jsonl
    (the held-out split: its first eval_questions problems)."""
    rationale_tokens: int = 256  # task=gsm8k: a rationale's length cap, in tokens (then <end> is forced)
    base: Optional[str] = None
    """The model every method starts from: a plain-LM checkpoint trained on the reasoning corpus. None: the
    learn_to_think recipe's pretrain stage, run (or reused, when finished with the same settings) in
    <run dir>/pretrain. task=gsm8k: a checkpoint, or a pretrained model's name or HF dir (loading.load_pretrained);
    None: model.name, or smollm2-135m (SmolLM2-135M-Instruct) where that is unset."""
    iterations: int = 1  # sample -> score -> dataset -> train -> evaluate rounds
    patience: int = 1
    """Stop after this many rounds without a better validation accuracy (training-split questions the
    methods never sample; the held-out split is never used for a decision). 0: run every round."""
    train_from: str = "base"
    """Each round fine-tunes `base` (STaR's choice: no drift across rounds) or `latest` (the previous round's
    model, or the best one with iterate_from=best). Sampling always uses the latest model."""
    iterate_from: str = "latest"
    """What the next round builds on (samples with, and trains from with train_from=latest): latest (the round
    just trained, whatever its validation accuracy) | best (the round with the best validation accuracy so far,
    base included: a round that made the model worse on validation is not iterated on)."""
    train_questions: int = 1024  # training-split questions sampled each round (the first documents' queries)
    max_difficulty: Optional[int] = None
    """Train and validate on the questions of at most this difficulty only (the reasoning corpus: hops, which
    the query itself states, `a2=`), e.g. 1 for System-2 distillation where one position can compute only a
    1-hop answer. The held-out split is still scored at every difficulty. None: every question."""
    val_questions: int = 256  # training-split questions of later documents, for the stopping rule
    eval_questions: int = 512  # held-out-split questions scored after every round (the first documents' queries)
    k: int = 1  # completions sampled per question
    temperature: float = 0.7  # sampling temperature of the training-data completions (evaluation is greedy)
    top_p: float = 1.0  # nucleus sampling of the training-data completions
    few_shot: int = 0  # worked examples (the document's other worked queries) in the sampling prompt
    rationalize: bool = True
    """star: sample again, with the gold answer as a hint in the prompt, for the questions answered wrongly;
    a correct rationalisation is trained on without the hint."""
    consistency: float = 0.75  # system2: the least majority share of the k answers for a question to be kept
    steps: int = 200  # SFT optimizer steps per round (the run's `optim` settings)
    replay_weight: float = 0.0
    """SFT rounds (star, rft, system2, cai's supervised stage), task=reasoning: each step adds replay_weight times
    the plain-LM NLL of a batch of the corpus's own text (whole training-split documents after the questions'
    ones: text of the kind the base was pretrained on, no new labels), so that fine-tuning on one kind of
    completion does not wear away what the rest of the text taught. 0: off."""
    replay_docs: int = 1024  # replay_weight > 0: the training-split documents the replay batches cycle through
    batch_size: int = 32  # SFT examples per step
    sample_batch: int = 512  # rows (questions x k) sampled at once
    keep_checkpoints: bool = True  # save each round's model under <run dir>/round_<n>/checkpoints
    eval_samples: int = 0  # rationales sampled per held-out question at `temperature` for a sampled accuracy; 0: off
    # -- the preference-based methods (explicit/preference.py)
    beta: float = 0.1
    """The preference loss's scale: DPO's and RPO's implicit reward beta * log(pi / pi_ref); IPO's tau (its
    target margin is 1 / (2 beta)); SimPO's scale of the mean per-token log-prob margin (its paper uses 2-10)."""
    loss: str = "dpo"
    """tpo, cpo: the rounds' preference loss (explicit/losses.py): dpo | rpo (DPO plus the chosen side's
    length-normalised NLL, weight nll_weight; Pang et al. 2024) | ipo (Azar et al. 2023) | simpo (reference-free,
    length-normalised margin with target simpo_gamma; Meng et al. 2024). V-STaR's verifier is always DPO: its
    best-of-k score is DPO's implicit reward."""
    nll_weight: float = 1.0  # loss=rpo: the weight of the chosen sequence's length-normalised NLL
    simpo_gamma: float = 0.5  # loss=simpo: the target margin gamma in -log sigmoid(beta * margin - gamma)
    judge: str = "answer"
    """tpo: what ranks a question's k responses: answer (each answer against the gold, AnswerCheck) | model (the
    judge model reads the question and one response, never the thought, through ModelJudge's rubric prompt and
    writes a score) | choice (the judge model reads two responses as a multiple-choice question, "which answer
    is correct? (A) ... (B) ...", as Constitutional AI's labeller does; its probabilities of A and B, asked in
    both orders, are averaged over every pair of distinct responses: each response's score is its mean win
    probability; preference.ChoiceJudge). With a model judge each round records its agreement with the
    answer check."""
    judge_model: str = "base"
    """tpo, judge=model|choice: the model that judges: base (the run's base model, fixed across rounds) | latest
    (the model that wrote the responses) | a checkpoint path (a step, checkpoints/ or run dir; its tokenizer
    must be the run's)."""
    judge_shots: int = 2  # tpo, judge=choice: worked multiple-choice questions before each asked one
    pairs_per_question: int = 4  # vstar: (correct, incorrect) verifier pairs kept per question and round, at most
    verifier_steps: int = 200  # vstar: DPO steps of the verifier, trained once on every round's pairs
    verifier_score: str = "ratio"
    """vstar: how the verifier ranks a solution for best-of-k: ratio (DPO's implicit reward,
    beta * (log pi_v(y|x) - log pi_ref(y|x))) | likelihood (log pi_v(y|x)). Both curves are reported."""
    best_of_n: int = 16  # vstar: solutions sampled per held-out question for the accuracy-vs-k curves (k <= n)
    beam: int = 2  # cpo: candidates kept per depth of the tree search
    proposals: int = 3  # cpo: next steps sampled per kept prefix (duplicates are merged)
    step_tokens: int = 1  # cpo: chain tokens per step (a step ends early at the chain's closing mark)
    propose_temperature: Optional[float] = None
    """cpo: the temperature the next steps are proposed at (None: `temperature`). Higher: siblings that differ,
    where a peaked model proposes the same step `proposals` times (duplicates are merged)."""
    step_filter: bool = False
    """cpo: drop proposals that are not well-formed steps: a chain token, or a final step's answer, that is not
    one of the corpus's symbols (tasks.step_alphabet), or an empty answer. Counted as malformed_steps."""
    pair_kept_siblings: bool = False
    """cpo: a kept sibling of a winning-path step, scored below it, is a rejected side too (by default only the
    pruned ones are; with beam > 1 most alternatives are kept and give no pair)."""
    self_eval: str = "agreement"
    """cpo: how the model rates a partial chain: agreement (the share of `rollouts` sampled continuations from
    it whose answer is the model's own majority answer to the question) | likelihood (the mean per-token
    probability of the chain so far) | model (ModelJudge's rubric prompt) | answer (the share of `rollouts`
    continuations whose answer is the gold answer: the answer check of a verifiable task, as TPO's judge=answer;
    not the paper's gold-free self-evaluation)."""
    rollouts: int = 4  # cpo, self_eval=agreement|answer: continuations sampled per rated prefix (and for the root's vote)
    # -- Constitutional AI (explicit/constitutional.py)
    cai_sl_rounds: int = 1
    """cai: rounds 1 .. cai_sl_rounds are the supervised stage (SFT on critiqued revisions); the later rounds
    are the AI-feedback stage (pairs of the model's k responses labelled against a principle, trained with
    explicit.loss). 0: AI feedback only; >= iterations: the supervised stage only."""
    cai_shots: int = 2  # cai: worked critiques (and labelled pairs) in the critique, revision and label prompts
    cai_critique_tokens: int = 48  # cai: a critique's length cap, in tokens (it ends at a newline)
    cai_labeller: str = "base"
    """cai: the model that labels the pairs: base (the run's base model, fixed across rounds, as CAI's
    feedback model is a separate one) | latest (the model that wrote the responses)."""
    cai_swap: bool = True  # cai: label each pair in both orders and average (cancels a preference for (A) or (B))
    cai_soft_label: str = "weight"
    """cai: how the label p (the probability that the chosen side is better, >= 0.5) enters the loss: weight
    (the pair's term is scaled by its confidence |2p - 1|) | hard (every kept pair weighs 1)."""
    cai_min_confidence: float = 0.0  # cai: pairs whose label confidence |2p - 1| is below this are dropped (counted)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"explicit.method must be one of {METHODS}, got {self.method!r}")
        if self.train_from not in ("base", "latest"):
            raise ConfigError(f"explicit.train_from must be base or latest, got {self.train_from!r}")
        if self.iterate_from not in ("latest", "best"):
            raise ConfigError(f"explicit.iterate_from must be latest or best, got {self.iterate_from!r}")
        for name, allowed in (("task", TASKS), ("judge", JUDGES), ("self_eval", SELF_EVALS),
                              ("verifier_score", VERIFIER_SCORES),
                              ("loss", PREFERENCE_LOSSES), ("cai_labeller", ("base", "latest")),
                              ("cai_soft_label", ("weight", "hard"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"explicit.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("iterations", "train_questions", "val_questions", "eval_questions", "k", "batch_size",
                     "sample_batch", "pairs_per_question", "best_of_n", "beam", "proposals", "step_tokens",
                     "rollouts", "cai_critique_tokens", "rationale_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"explicit.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "few_shot", "steps", "verifier_steps", "eval_samples", "nll_weight", "simpo_gamma",
                     "cai_sl_rounds", "cai_shots", "judge_shots", "replay_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"explicit.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ConfigError(f"explicit.temperature must be >= 0, got {self.temperature}")
        if self.propose_temperature is not None and not self.propose_temperature >= 0:
            raise ConfigError(f"explicit.propose_temperature must be >= 0 (or null), got {self.propose_temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"explicit.top_p must be in (0, 1], got {self.top_p}")
        if not self.beta > 0:
            raise ConfigError(f"explicit.beta must be > 0, got {self.beta}")
        if not 0 < self.consistency <= 1:
            raise ConfigError(f"explicit.consistency must be in (0, 1], got {self.consistency}")
        if self.max_difficulty is not None and self.max_difficulty < 1:
            raise ConfigError(f"explicit.max_difficulty must be >= 1 (or null), got {self.max_difficulty}")
        if self.replay_docs < 1:
            raise ConfigError(f"explicit.replay_docs must be >= 1, got {self.replay_docs}")
        if self.task == "gsm8k" and self.max_difficulty is not None:
            raise ConfigError("explicit.max_difficulty: the reasoning corpus's hops; task=gsm8k's problems are not graded")
        if self.task == "gsm8k" and self.replay_weight > 0:
            raise ConfigError("explicit.replay_weight: replays the reasoning corpus's text; task=gsm8k has none")
        if self.task == "gsm8k" and self.step_filter:
            raise ConfigError("explicit.step_filter=true (explicit=cpo's default) keeps the reasoning corpus's chain "
                              "symbols; task=gsm8k has none: add explicit.step_filter=false")
        if not str(self.judge_model).strip():
            raise ConfigError("explicit.judge_model must be base, latest or a checkpoint path, got ''")
        if not 0 <= self.cai_min_confidence <= 1:
            raise ConfigError(f"explicit.cai_min_confidence must be in [0, 1], got {self.cai_min_confidence}")
        if self.method == "cai" and self.cai_sl_rounds < self.iterations and self.k < 2:
            raise ConfigError(f"explicit.k must be >= 2 for cai's AI-feedback rounds (two responses to compare), "
                              f"got {self.k}")
