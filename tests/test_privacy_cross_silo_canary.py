"""The cross-silo canary: private canary records planted in the task data, and so in some silos'
private splits, never appear (exactly, or as any 6-word run of them) in any synthetic text the
server's LLM wrote in a multi-round `crosslm simulate` run, the texts returned to every silo
included. A negative control shows that the check finds a planted leak."""
import csv
import json

import pytest

from crosslm_server.experiments.cli import main
from crosslm_server.method.config import load_config
from crosslm_shared.data import load_examples, split_task
from crosslm_shared.tasks import load_task

N = 6  # a 6-word run of a canary record counts as a leak
# unusual runs of the toy task's own words: the tiny LLM can write every one of them
CANARIES = ["superb dull lovely boring meh plot awful story okay film",
            "average great poor movie fine ok bad superb the story"]


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def leaks(secrets: list[str], texts: list[str], n: int = N) -> list[tuple[str, str]]:
    """(secret, text) for every text holding a secret verbatim or any n-word run of it."""
    grams = {s: ngrams(s, n) for s in secrets}
    return [(s, t) for t in texts for s in secrets if s.lower() in t.lower() or grams[s] & ngrams(t, n)]


def test_the_check_finds_a_planted_leak_and_nothing_in_clean_text():
    leaked = ["write one positive review . " + " ".join(CANARIES[0].split()[2:9]) + " it was",
              CANARIES[1].upper()]
    found = leaks(CANARIES, leaked + ["good film", "superb dull lovely movie"])
    assert [(s, t) for s, t in found] == [(CANARIES[0], leaked[0]), (CANARIES[1], leaked[1])]


@pytest.mark.privacy
def test_no_canary_reaches_any_synthetic_text_over_rounds(tmp_path, tiny_sim_config):
    cfg = load_config(tiny_sim_config)
    task_path = cfg.task
    data = load_task(task_path).data.path
    with open(data, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 40 records per canary (numbered: the loader drops duplicates), so the silos' draws include some
    rows += [{"text": f"{c} {i}", "label": lab} for c, lab in zip(CANARIES, ("positive", "negative")) for i in range(40)]
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    # which silos hold the canaries privately: the simulate run's own split
    task = load_task(task_path)
    split = split_task(load_examples(task), task.num_labels, cfg.split, seed=cfg.seed)
    holders = [s.name for s in split.silos if leaks(CANARIES, list(s.train.texts + s.val.texts))]
    assert holders, "no silo drew a canary record: the test would prove nothing"
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(tiny_sim_config), "--out", str(out), "--set", "zerogen=false"]) == 0
    files = sorted(out.glob("samples-r*-*.jsonl"))
    assert len(files) == cfg.rounds * cfg.split.n_silos
    texts = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
    assert len(texts) > 0
    assert leaks(CANARIES, texts) == []
