"""The server's causal LLM: load once (GGUF dequantized and cached), wrap with a LoRA adapter.

The frozen base G_0 is the same module with the adapter disabled (peft's
``disable_adapter()``), so no second copy of the LLM is ever held in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosslm_shared import assets
from crosslm_shared.atomic import atomic_dir
from crosslm_shared.slm import device as torch_device
from crosslm_shared.errors import ConfigError
from crosslm_server.method.config import LLMConfig

log = logging.getLogger(__name__)


def _dtype(cfg: LLMConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def dequantized_smollm2() -> Path:
    """Dequantize the packaged GGUF once; cache as safetensors keyed by the GGUF's SHA-256."""
    gguf = assets.smollm2_gguf()
    digest = assets.sha256_file(gguf)[:16]
    target = assets.cache_dir() / f"smollm2-135m-{digest}"
    if (target / "config.json").exists():
        return target
    log.info("dequantizing %s once into %s (about 30 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, replace=False) as tmp:  # same content whoever writes it
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def model_folder(cfg: LLMConfig) -> Path:
    if cfg.model == "smollm2-135m":
        return dequantized_smollm2()
    path = Path(cfg.model)
    if not (path / "config.json").exists():
        raise ConfigError(f"llm.model = {cfg.model!r} is neither 'smollm2-135m' nor a model folder with config.json")
    return path


@dataclass
class LLM:
    """The LoRA-wrapped model and its tokenizer (pad = eos, padding on the left)."""

    model: PeftModel
    tokenizer: object
    device: torch.device

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if "lora_" in k}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def save_adapter(self, path: str | Path) -> Path:
        path = Path(path)
        self.model.save_pretrained(path)
        return path

    def load_adapter(self, path: str | Path) -> None:
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model, state)


def wrap_lora(base, tokenizer, cfg: LLMConfig, device: torch.device) -> LLM:
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LLM(model=model, tokenizer=tokenizer, device=device)


def load_llm(cfg: LLMConfig) -> LLM:
    folder = model_folder(cfg)
    device = torch_device()
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(cfg)).to(device)
    return wrap_lora(base, tok, cfg, device)
