"""Test doubles, loaded by import path from configs in tests and benchmarks only (never shipped).

- ``TINY_ENGINE`` (`tiny_engine.TinyEngine`): walks a round's shape without an LLM;
- ``ECHO_ENGINE`` (`echo_engine.EchoEngine`): hands the submitted SLM back unchanged;
- ``TINY_ARCH`` (`tiny_slm.TINY`): a tiny random BERT the silo daemon trains in milliseconds.

`tests/conftest.py` puts this folder's parent on ``PYTHONPATH`` so that servers and daemons the
tests start as processes find them too.
"""
TINY_ENGINE = "fakes.tiny_engine:TinyEngine"
ECHO_ENGINE = "fakes.echo_engine:EchoEngine"
TINY_ARCH = "fakes.tiny_slm:TINY"
