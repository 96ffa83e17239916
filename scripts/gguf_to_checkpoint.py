"""Turn Gemma-3-270M's GGUF into a plain transformers checkpoint that vLLM's CPU build loads
(vLLM 0.32 cannot read GGUF). Run in the vLLM venv, which has torch and transformers, plus
``gguf`` and ``accelerate``:

    python gguf_to_checkpoint.py MODEL.gguf OUT_DIR

transformers dequantizes the GGUF on load; the quantizer it records must be cleared before
saving, or the checkpoint claims a quantization it does not have. The GGUF carries no chat
template, so Gemma's turn format is written in; its two stop tokens are ``<eos>`` (1) and
``<end_of_turn>`` (106). It is a base model: it continues text, it does not follow orders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
STOP_TOKEN_IDS = [1, 106]


def convert(gguf: Path, out: Path) -> None:
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = STOP_TOKEN_IDS
    model.config.eos_token_id = STOP_TOKEN_IDS
    tokenizer.add_bos_token = True
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"saved {out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
