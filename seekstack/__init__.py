"""seekstack: the DeepSeek-V3 stack in plain PyTorch."""

from seekstack.checkpoint import load_pretrained, save_pretrained
from seekstack.config import ModelConfig, preset
from seekstack.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "load_pretrained", "preset", "save_pretrained"]
