"""A tiny random BERT classifier with the same surface as crosslm_shared.slm's SLM.

Used by tests (`[silo] arch = "fakes.tiny_slm:TINY"`, `TinyFamily` below): it trains in milliseconds on 2 cores and
produces a real `save_pretrained` folder (config.json, model.safetensors, tokenizer files,
crosslm.json), so everything downstream (bundle, upload, round, download) is exercised.
The vocabulary is a fixed word list, never built from private data.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a an and or but not is was it this that film movie story plot actor good great "
         "bad awful boring fun funny dull love hate best worst fine nice poor weak strong "
         "free win prize call now text stop reply cash offer hello meet see you me we they "
         "i he she very really so too just more less all no yes one two").split()
MAX_LEN = 32


def _tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


class TinySLM:
    def __init__(self, model: BertForSequenceClassification, tokenizer, labels: Sequence[str],
                 *, temperature: float = 1.0, arch: str = "tiny"):
        self.model, self.tokenizer = model, tokenizer
        self.labels, self.temperature, self.arch = list(labels), float(temperature), arch

    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LEN,
                             return_tensors="pt")
        return self.model(**enc).logits

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        self.model.eval()
        with torch.no_grad():
            return torch.softmax(self._logits(texts) / self.temperature, dim=-1).numpy()

    def evaluate(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        if not texts:
            return 0.0
        pred = self.predict_proba(texts).argmax(axis=1)
        return float((pred == np.asarray(labels)).mean())

    def train(self, texts: Sequence[str], ys: Sequence[int], *, epochs: int = 3, lr: float = 1e-3,
              batch_size: int = 16, progress=None) -> None:
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        for _ in range(epochs):
            for i in range(0, len(texts), batch_size):
                loss = torch.nn.functional.cross_entropy(
                    self._logits(texts[i:i + batch_size]), torch.tensor(list(ys[i:i + batch_size])))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if progress is not None:
                    progress.update(len(texts[i:i + batch_size]))
        self.model.eval()

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "crosslm.json").write_text(json.dumps(
            {"labels": self.labels, "arch": self.arch, "temperature": self.temperature}))
        return folder


def new_tiny_slm(labels: Sequence[str], *, seed: int = 0, tokenizer_dir: Path) -> TinySLM:
    torch.manual_seed(seed)
    tok = _tokenizer(Path(tokenizer_dir))
    config = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=MAX_LEN + 2,
                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    return TinySLM(BertForSequenceClassification(config), tok, labels)


def load_tiny(folder: Path) -> TinySLM:
    folder = Path(folder)
    meta = json.loads((folder / "crosslm.json").read_text())
    model = BertForSequenceClassification.from_pretrained(folder)
    tok = BertTokenizerFast.from_pretrained(folder)
    return TinySLM(model, tok, meta["labels"], temperature=meta.get("temperature", 1.0),
                   arch=meta.get("arch", "tiny"))


class TinyFamily:
    """The daemon's model family for `[silo] arch = "fakes.tiny_slm:TINY"` (crosslm_client.models)."""

    name = "tiny"

    def train_new(self, config, train, held, *, work_dir: Path) -> TinySLM:
        from tqdm import tqdm

        t = config.train
        model = new_tiny_slm(list(config.silo.labels), seed=config.silo.seed, tokenizer_dir=work_dir / "tokenizer")
        with tqdm(total=len(train[0]) * t.max_epochs, desc=f"training {config.silo.name}", unit="ex") as bar:
            model.train(*train, epochs=t.max_epochs, lr=t.lrs[0], batch_size=t.batch_size, progress=bar)
        return model

    def continue_and_choose(self, config, current, returned, train, held, synthetic=None):
        from crosslm_client.models import keep_better

        t = config.train
        if t.continue_epochs:
            returned.train(*train, epochs=t.continue_epochs, lr=t.lrs[0], batch_size=t.batch_size)
        chosen, info = keep_better(current, returned, held)
        if info["adopted"]:
            self.calibrate(config, chosen, held)
        return chosen, info

    def load(self, config, folder: Path) -> TinySLM:
        return load_tiny(folder)

    def calibrate(self, config, model: TinySLM, held) -> float:
        from crosslm_client.models import grid_temperature

        model.temperature = grid_temperature(model, *held)
        return model.temperature


TINY = TinyFamily()
