"""Plain-PyTorch decoder models (Llama family) and their loaders."""
from models.config import ModelConfig
from models.llama import Transformer

__all__ = ["ModelConfig", "Transformer"]
