"""The model core: specs from config.json, memory-mapped checkpoints, the reference forward.

Everything else in offloadkit (plans, executors, benchmarks) is checked against this package:
``ReferenceModel`` computes what Hugging Face transformers computes for Mixtral, LLaMA, Qwen2-MoE
and PhiMoE, over weights read zero-copy from safetensors.
"""

from offloadkit.model.checkpoint import Checkpoint, open_checkpoint
from offloadkit.model.generate import SamplingConfig, generate_ids, stream_text
from offloadkit.model.reference import KVCache, ReferenceModel
from offloadkit.model.spec import Block, ModelSpec, TensorSpec
from offloadkit.model.tokenizer import Tokenizer, load_tokenizer
from offloadkit.model.writer import make_config, write_checkpoint
from offloadkit.model.zoo import load_spec, resolve_model, zoo_names

__all__ = [
    "Block", "Checkpoint", "KVCache", "ModelSpec", "ReferenceModel", "SamplingConfig", "TensorSpec", "Tokenizer",
    "generate_ids", "load_spec", "load_tokenizer", "make_config", "open_checkpoint",
    "resolve_model", "stream_text", "write_checkpoint", "zoo_names",
]
