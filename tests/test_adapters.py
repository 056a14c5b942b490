import pytest
import torch

from crosslm_server.engines.adapters import AdapterStore
from crosslm_server.method.llm import LLMConfig, load_llm
from crosslm_shared.errors import NotFoundError


def test_versions_current_rollback_and_submission_lookup(tmp_path, tiny_llm_dir):
    llm = load_llm(LLMConfig(model=str(tiny_llm_dir), lora_r=2, target_modules=("q_proj",)))
    store = AdapterStore(tmp_path / "adapters")
    assert store.current() is None
    v1 = store.save(llm, submission_id="s1", silo="a", task="t", metrics={"kl": 0.1})
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    v2 = store.save(llm, submission_id="s2", silo="b", task="t", metrics={})
    assert [v.version for v in store.versions()] == [1, 2] and store.current().version == 2
    assert store.for_submission("s1").version == 1 and store.for_submission("nope") is None
    store.rollback(1)
    assert store.current().version == 1
    llm.load_adapter(store.current().path)
    assert all(float(p.abs().sum()) == 0 for n, p in llm.model.named_parameters() if "lora_B" in n)
    with pytest.raises(NotFoundError, match="versions: \\[1, 2\\]"):
        store.rollback(7)
    assert not list((tmp_path / "adapters").glob("*.partial*"))
    assert v1.meta["metrics"] == {"kl": 0.1} and v2.path.name == "v00002"
