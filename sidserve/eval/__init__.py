"""Evaluation on real interaction data (docs/evaluation.md has the method and the results): SASRec behavioral embeddings,
every tokenizer on the same inputs, generative retrieval and discriminative ranking,
overall and for head vs long-tail items. Entry point: ``jobs/evaluate.py``."""

from sidserve.eval.config import EvalConfig
from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.pipeline import run_evaluation

__all__ = ["Dataset", "EvalConfig", "load_dataset", "run_evaluation"]
