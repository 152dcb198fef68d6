"""Convert a GGUF chat model into a plain bfloat16 safetensors checkpoint vLLM can load (standalone script).

Run with the vLLM venv's python (it needs torch, transformers, gguf and accelerate), by path:
    python convert_gguf.py MODEL.gguf OUTPUT_DIR
It imports nothing from gpugate_runtime, so it runs in that venv without the runtime installed there
(gpugate_runtime.modelprep runs it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert(gguf: Path, output: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers dequantizes GGUF on load but keeps the quantizer's bookkeeping; without
    # these the saved config claims a GGUF quantization that vLLM would try to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("output", type=Path, help="directory to write the checkpoint into")
    args = parser.parse_args()
    convert(args.gguf, args.output)


if __name__ == "__main__":
    main()
