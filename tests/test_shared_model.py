"""A model shared between threads (issue 27, item 6): a thread taking training steps and
threads encoding at the same time; every encode sees the weights of one step, never half of
one; concurrent encodes agree with serial ones; the lock lets readers share and puts a
waiting writer first."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np

import ksae
from ksae.locking import ReadWriteLock

N_STEPS = 60
N_READERS = 3


def encodes_of(state, X):
    """The encode of X by each model state, as bytes to compare."""
    out = set()
    for s in state:
        values, indices = s.encode(X)
        out.add((values.tobytes(), indices.tobytes()))
    return out


def test_encodes_during_training_see_the_weights_of_one_step(rng):
    X_train = rng.standard_normal((128, 48)).astype(np.float32)
    X = rng.standard_normal((32, 48)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=256, k=8, random_state=0, n_threads=1, lr=1e-2)
    sae.partial_fit(X_train)
    snapshots = [copy.deepcopy(sae.state_)]
    seen: list[tuple[bytes, bytes]] = []
    done = threading.Event()

    def train():
        for _ in range(N_STEPS):
            sae.partial_fit(X_train)
            snapshots.append(copy.deepcopy(sae.state_))  # only this thread writes: consistent
        done.set()

    def read():
        got = []
        while not done.is_set():
            values, indices = sae.encode(X)
            got.append((values.tobytes(), indices.tobytes()))
        seen.extend(got)

    threads = [threading.Thread(target=train)] + [threading.Thread(target=read)
                                                 for _ in range(N_READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = encodes_of(snapshots, X)
    assert len(allowed) > N_STEPS // 2, "the steps should change the code"
    torn = sum(code not in allowed for code in seen)
    assert torn == 0, f"{torn} of {len(seen)} encodes saw weights from the middle of a step"
    assert len(set(seen) & allowed) > 1, "the encodes should have run while training stepped"


def test_concurrent_encodes_agree_with_serial_ones(rng):
    # Several encodes at once share (or not) the scratch arrays: each result is the serial one.
    sae = ksae.SparseAutoencoder(n_latents=300, k=10, random_state=0, n_threads=1)
    sae.partial_fit(rng.standard_normal((64, 40)).astype(np.float32))
    inputs = [rng.standard_normal((n, 40)).astype(np.float32) for n in (3, 17, 64, 200)]
    want = [sae.encode(X) for X in inputs]
    failures: list[str] = []

    def read(i):
        for _ in range(40):
            j = i % len(inputs)
            values, indices = sae.encode(inputs[j])
            if not (np.array_equal(values, want[j].values) and np.array_equal(indices, want[j].indices)):
                failures.append(f"input {j}")
            i += 1

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_readers_share_and_a_waiting_writer_goes_first():
    lock = ReadWriteLock()
    order: list[str] = []
    lock.read.acquire()
    lock.read.acquire()  # two readers at once (from one thread here: the lock counts them)

    def writer():
        with lock.write:
            order.append("writer")

    def late_reader():
        with lock.read:
            order.append("late reader")

    w = threading.Thread(target=writer)
    w.start()
    while not lock._writers_waiting:  # the writer waits for the two readers
        time.sleep(0.001)
    r = threading.Thread(target=late_reader)
    r.start()
    time.sleep(0.05)
    assert order == [], "neither may enter while the readers hold the lock"
    lock.read.release()
    lock.read.release()
    w.join()
    r.join()
    assert order == ["writer", "late reader"]


def test_a_copied_model_has_its_own_lock(rng):
    sae = ksae.SparseAutoencoder(n_latents=20, k=3, random_state=0).partial_fit(
        rng.standard_normal((8, 6)).astype(np.float32))
    state = sae.state_
    clone = copy.deepcopy(state)
    with state.access.write:  # the original is being written: the copy reads freely
        clone.encode(np.ones((2, 6), np.float32))
    assert clone.access is not state.access
