"""Hugging Face DeepSeek-V2/V3 checkpoints in and out: the one place that owns the key mapping."""

from seekstack.checkpoint.fp8 import dequantize_fp8, quantize_fp8
from seekstack.checkpoint.keys import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, checkpoint_key, layer_key
from seekstack.checkpoint.load import load_pretrained
from seekstack.checkpoint.quantized import MappedCopy, stored_tensor_bytes
from seekstack.checkpoint.reader import (
    CheckpointReader,
    check_safetensors,
    read_config,
    read_json_object,
    read_safetensors,
    stored_float_dtype,
    stores_quantized_weights,
)
from seekstack.checkpoint.save import (
    MODEL_FOLDER_FILES,
    checkpoint_tensors,
    refuse_hf_export,
    save_aligned,
    save_pretrained,
    write_config,
    write_generation_config,
    write_pretrained_files,
    write_shards,
)

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "MODEL_FOLDER_FILES",
    "SINGLE_FILE",
    "CheckpointError",
    "CheckpointReader",
    "MappedCopy",
    "check_safetensors",
    "checkpoint_key",
    "checkpoint_tensors",
    "dequantize_fp8",
    "layer_key",
    "load_pretrained",
    "quantize_fp8",
    "read_config",
    "read_json_object",
    "read_safetensors",
    "refuse_hf_export",
    "save_aligned",
    "save_pretrained",
    "stored_float_dtype",
    "stored_tensor_bytes",
    "stores_quantized_weights",
    "write_config",
    "write_generation_config",
    "write_pretrained_files",
    "write_shards",
]
