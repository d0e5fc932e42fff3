"""The model: a hand-written Llama-family decoder, its loaders and tokenizer."""
from reflectevo.model.config import ModelConfig
from reflectevo.model.loader import load_model
from reflectevo.model.tokenizer import Tokenizer
from reflectevo.model.transformer import Transformer

__all__ = ["ModelConfig", "Tokenizer", "Transformer", "load_model"]
