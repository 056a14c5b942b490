"""Tiny random models built in-process from a config: no weights, no network, seconds to run."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch

# The test doubles (tests/fakes) are loaded by import path from configs, also by the servers and
# daemons the tests start as processes: they inherit this.
_TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join([_TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])

WORDS = ("good great fine superb lovely bad awful poor dull boring movie film plot actor scene the a is was "
         "and it this very not story ok meh average okay").split()
PUNCT = ['"', ".", ",", ":", "?", "!", "'"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def _vocab() -> list[str]:
    return SPECIALS + WORDS + PUNCT + ["review", "sentiment", "what", "of", "write", "one", "sentence",
                                       "positive", "negative", "neutral", "label", "answer", "text"]


@pytest.fixture(scope="session")
def tiny_slm_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder folder (random weights, WordPiece vocab) usable as an SLM arch."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab())}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def build_word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM folder with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_task(tmp: Path, *, labels=("negative", "positive", "neutral"), n_per_label: int = 80) -> Path:
    """A task TOML with a local CSV of toy examples: label i draws from its own word group."""
    groups = {"negative": ["bad", "awful", "poor", "dull", "boring"], "positive": ["good", "great", "fine", "superb", "lovely"],
              "neutral": ["ok", "meh", "average", "okay"]}
    rng = random.Random(0)
    rows = []
    for lab in labels:
        for i in range(n_per_label):
            words = [rng.choice(groups[lab]) for _ in range(3)] + [rng.choice(["movie", "film", "plot", "story"])]
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {i}", "label": lab})
    data = tmp / "toy.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    label_toml = "\n".join(f'[[labels]]\nname = "{lab}"\nverbalizer = "{lab}"\ndescription = "{lab}"\n' for lab in labels)
    spec = tmp / "toy.toml"
    spec.write_text(f'''name = "toy"
[data]
format = "csv"
path = "{data}"
{label_toml}
[generation]
templates = ["write one {{description}} review .", "write a {{description}} sentence ."]
prefix = "review : \\""
closing_mark = "\\""
[classification]
template = "what sentiment of review : \\"{{text}}\\""
answer_prefix = "sentiment :"
''')
    return spec


@pytest.fixture()
def toy_task_path(tmp_path) -> Path:
    return write_task(tmp_path)


@pytest.fixture()
def tiny_sim_config(tmp_path, tiny_llm_dir, tiny_slm_dir, toy_task_path) -> Path:
    """A simulate config on tiny random models and the toy 3-label task (seconds to run)."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'''
task = "{toy_task_path}"
rounds = 2
archs = ["{tiny_slm_dir}"]
[split]
n_silos = 2
n_private = 24
n_test = 12
n_llm_test = 12
n_judge = 30
alpha = 0.5
min_per_label = 1
[llm]
model = "{tiny_llm_dir}"
target_modules = ["q_proj", "v_proj"]
[round.generate]
per_label = 4
batch_size = 6
max_new_tokens = 12
[round.update]
batch_size = 4
[round.filter]
min_words = 1
[round.slm]
lrs = [1e-3]
max_epochs = 2
[eval]
n_ppl_docs = 2
ppl_max_tokens = 32
judge_per_label = 2
judge_arch = "{tiny_slm_dir}"
''')
    return cfg


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session (tests/pg_server.py); skips only where no binaries exist."""
    from pg_server import PostgresServer, find_bindir

    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg (the `test` extra installs it)")
    if find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or under "
                    "/usr/lib/postgresql/*/bin: `bash scripts/bootstrap --test` installs them with apt-get")
    server = PostgresServer().start()  # in its own temporary folder, deleted by stop()
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_database()
