"""Checkpoint formats: Hugging Face safetensors directories, Meta consolidated.*.pth + params.json,
llama2.c .bin, GGUF and herd's quantized directories, all read into one `Checkpoint` (herd names,
Meta's rotary layout), and a model built from any of them (`load_model`)."""

from herd.checkpoint.base import Checkpoint
from herd.checkpoint.convert import convert, quantize_checkpoint
from herd.checkpoint.gguf_file import read_gguf_metadata
from herd.checkpoint.hf import save_hf
from herd.checkpoint.load import build_model, detect_format, load_checkpoint, load_model, read_config, read_tokenizer
from herd.checkpoint.meta import save_meta

__all__ = ["Checkpoint", "build_model", "convert", "detect_format", "load_checkpoint", "load_model",
           "quantize_checkpoint", "read_config", "read_gguf_metadata", "read_tokenizer", "save_hf", "save_meta"]
