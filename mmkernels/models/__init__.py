"""Reference models built on mmkernels' ops, and the offline data they train on.

``shapes``: procedurally generated coloured-shape scenes with captions and question/answer pairs
(``make_split``), and the word-level tokenizer over their vocabulary (``TOKENIZER``).
``fusion``: ``FusionModel``, a small vision–language model on every public op.
``demo``: ``python -m mmkernels demo``, its training in three stages.
"""
from .fusion import FusionConfig, FusionModel
from .shapes import (ANSWERS, QUESTION_TYPES, TOKENIZER, Split, Tokenizer, make_split,
                     train_test_splits)

__all__ = ["ANSWERS", "QUESTION_TYPES", "TOKENIZER", "FusionConfig", "FusionModel", "Split",
           "Tokenizer", "make_split", "train_test_splits"]
