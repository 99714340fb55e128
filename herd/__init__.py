"""herd: the Llama 3 herd of models and Llama 4 in one readable PyTorch codebase.

    import herd
    model, tokenizer = herd.load("smollm2-135m-instruct")   # a name, a directory or a .gguf file
    logits = model(tokens)                                   # (B, T) ids → (B, T, vocab) fp32
    text = herd.generate(model, tokenizer, "prompt", max_new_tokens=32, temperature=0.0)
"""

from herd.api import generate, load, stream
from herd.errors import HerdError
from herd.models.args import PRESETS, ModelArgs, get_preset
from herd.models.llama3 import Transformer

__all__ = ["HerdError", "ModelArgs", "PRESETS", "Transformer", "generate", "get_preset", "load", "stream"]
__version__ = "0.1.0"
