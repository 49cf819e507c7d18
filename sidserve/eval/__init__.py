"""Evaluation on real interaction data (DESIGN.md §8): SASRec behavioral embeddings,
every tokenizer on the same inputs, generative retrieval and discriminative ranking,
overall and for head vs long-tail items. Entry point: ``jobs/evaluate.py``."""

from sidserve.eval.data import Dataset, load_dataset
from sidserve.eval.pipeline import EvalConfig, run_evaluation

__all__ = ["Dataset", "EvalConfig", "load_dataset", "run_evaluation"]
