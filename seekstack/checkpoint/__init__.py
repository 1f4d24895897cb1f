"""Hugging Face DeepSeek-V2/V3 checkpoints in and out: the one place that owns the key mapping.

Names load on first use, so `from seekstack.checkpoint.folder import CheckpointError` costs no torch import."""

from __future__ import annotations

from seekstack.lazy import lazy_attributes

_EXPORTS = {
    "dequantize_fp8": "seekstack.checkpoint.fp8",
    "quantize_fp8": "seekstack.checkpoint.fp8",
    "CONFIG_FILE": "seekstack.checkpoint.folder",
    "INDEX_FILE": "seekstack.checkpoint.folder",
    "SINGLE_FILE": "seekstack.checkpoint.folder",
    "CheckpointError": "seekstack.checkpoint.folder",
    "read_json_object": "seekstack.checkpoint.folder",
    "checkpoint_key": "seekstack.checkpoint.keys",
    "layer_key": "seekstack.checkpoint.keys",
    "load_pretrained": "seekstack.checkpoint.load",
    "MappedCopy": "seekstack.checkpoint.quantized",
    "stored_tensor_bytes": "seekstack.checkpoint.quantized",
    "CheckpointReader": "seekstack.checkpoint.reader",
    "check_safetensors": "seekstack.checkpoint.reader",
    "read_config": "seekstack.checkpoint.reader",
    "read_safetensors": "seekstack.checkpoint.reader",
    "stored_float_dtype": "seekstack.checkpoint.reader",
    "stores_quantized_weights": "seekstack.checkpoint.reader",
    "MODEL_FOLDER_FILES": "seekstack.checkpoint.save",
    "checkpoint_tensors": "seekstack.checkpoint.save",
    "refuse_hf_export": "seekstack.checkpoint.save",
    "save_aligned": "seekstack.checkpoint.save",
    "save_pretrained": "seekstack.checkpoint.save",
    "write_config": "seekstack.checkpoint.save",
    "write_generation_config": "seekstack.checkpoint.save",
    "write_pretrained_files": "seekstack.checkpoint.save",
    "write_shards": "seekstack.checkpoint.save",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
