"""Content checks that misbehave, for tests/test_admission_checker.py.

They live in a module of their own (not in the test file) because the checker runs them in
its child process, which imports them by name.
"""
import os
import time


def greedy(folder, manifest):
    """Takes memory until the allocation fails."""
    hog = []
    while True:
        hog.append(bytearray(64 * 1024 * 1024))


def slow(folder, manifest):
    time.sleep(600)


def crash(folder, manifest):
    os._exit(3)


def sleepy(folder, manifest):
    """Passes, after longer than the tests' server idle timeout (1 s)."""
    time.sleep(2.5)
    return {"parameters": 1}
