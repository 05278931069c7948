"""Per-domain metrics (metrics.py, pure) and the evaluation of a model on every domain (runner.evaluate_model)."""
from bar_jax.evals.metrics import call_matches, exact_match, extract_answer, is_refusal, nll_to_score, token_nll
from bar_jax.evals.runner import evaluate_model

__all__ = ["call_matches", "evaluate_model", "exact_match", "extract_answer", "is_refusal", "nll_to_score", "token_nll"]
