"""The server's durable state: the `Store` contract (base) and one module per backend.

`memory` (tests, throw-away demos) and `sqlite` (the default) implement it; a backend is picked by
`[store] kind` in the server config (docs/service.md).
"""
from crosslm_server.service.store.base import Store, conflict_message
from crosslm_server.service.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "conflict_message"]
