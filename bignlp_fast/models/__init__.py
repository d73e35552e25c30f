"""Models assembled from bignlp_fast.nn and bignlp_fast.ops: thin, readable, one config dataclass each."""

from bignlp_fast.models.classifiers import (ClassifierOutput, RNNClassifier, RNNClassifierConfig, TextCNNClassifier,
                                            TextCNNConfig)

__all__ = ["ClassifierOutput", "RNNClassifier", "RNNClassifierConfig", "TextCNNClassifier", "TextCNNConfig"]
