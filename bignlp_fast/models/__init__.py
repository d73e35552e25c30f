"""Models assembled from bignlp_fast.nn and bignlp_fast.ops: thin, readable, one config dataclass each.
BERT (and GPT-2) use Hugging Face's parameter names and load its checkpoint directories as they are."""

from bignlp_fast.models.bert import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel,
                                     BertOutput, MaskedLMOutput, SequenceClassifierOutput)
from bignlp_fast.models.gpt import CausalLMOutput, GPTConfig, GPTLMHeadModel, GPTModel, KVCache
from bignlp_fast.models.classifiers import (ClassifierOutput, RNNClassifier, RNNClassifierConfig, TextCNNClassifier,
                                            TextCNNConfig)

__all__ = ["BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "BertOutput",
           "CausalLMOutput", "ClassifierOutput", "GPTConfig", "GPTLMHeadModel", "GPTModel", "KVCache", "MaskedLMOutput",
           "RNNClassifier", "RNNClassifierConfig", "SequenceClassifierOutput", "TextCNNClassifier", "TextCNNConfig"]
