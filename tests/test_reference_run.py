"""A reference training run pinned: a few weights and the per-epoch losses of a small fit,
recorded with ksae 39d77f6 (before the estimator, trainer and model state were split apart).

Training must stay bitwise the same through refactors. On the build the figures were
recorded with (Release, x86-64-v4: what ``pip install .`` makes on an AVX-512 machine) they
are compared exactly; another instruction set or optimisation level (the sanitizers' Debug
build) may round differently, so there they are compared to 1e-5 (a change of logic moves
them far more)."""

from __future__ import annotations

import numpy as np
import pytest

import ksae

RECORDED_BUILD = {"arch": "x86-64-v4", "build_type": "Release"}
PINNED = {
    "float32": {
        "W_enc_[:3, 0]": ["0x1.d9952e0000000p-6", "-0x1.2dbb640000000p-5", "0x1.4b619a0000000p-3"],
        "W_dec_[5, :3]": ["0x1.c0d04e0000000p-5", "-0x1.7b8d400000000p-3", "-0x1.8715720000000p-4"],
        "b_enc_[:3]": ["-0x1.2bc02c0000000p-6", "-0x1.6f18680000000p-6", "-0x1.61e6d60000000p-6"],
        "b_dec_[:3]": ["-0x1.4c46b00000000p-7", "0x1.137b2e0000000p-7", "0x1.8ae0260000000p-7"],
        "loss": ["0x1.56e5272180000p-1", "0x1.4659cce880000p-1", "0x1.3742268b00000p-1"],
    },
    "float64": {
        "W_enc_[:3, 0]": ["0x1.d995319ee3a36p-6", "-0x1.2dbb66a2fd81ap-5", "0x1.4b619c936b976p-3"],
        "W_dec_[5, :3]": ["0x1.c0d04aa9e371dp-5", "-0x1.7b8d3ca762fc5p-3", "-0x1.8715724178715p-4"],
        "b_enc_[:3]": ["-0x1.2bc029add959fp-6", "-0x1.6f186d2939886p-6", "-0x1.61e6d9e7110dfp-6"],
        "b_dec_[:3]": ["-0x1.4c46c11703344p-7", "0x1.137b2a0eaf727p-7", "0x1.8ae0291ef1694p-7"],
        "loss": ["0x1.56e52694c3443p-1", "0x1.4659cc29355a6p-1", "0x1.3742256bee6fap-1"],
    },
}


def figures(sae: ksae.SparseAutoencoder) -> dict[str, np.ndarray]:
    return {"W_enc_[:3, 0]": sae.W_enc_[:3, 0], "W_dec_[5, :3]": sae.W_dec_[5, :3],
            "b_enc_[:3]": sae.b_enc_[:3], "b_dec_[:3]": sae.b_dec_[:3],
            "loss": np.array(sae.history_["loss"])}


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_reference_run_trains_as_recorded(dtype, n_threads):
    X = np.random.default_rng(2024).standard_normal((256, 16)).astype(np.float32)
    sae = ksae.SparseAutoencoder(n_latents=32, k=4, random_state=0, dtype=dtype,
                                 n_threads=n_threads).fit(X, epochs=3, batch_size=32)
    info = ksae.build_info()
    exact = all(info.get(key) == value for key, value in RECORDED_BUILD.items())
    for name, got in figures(sae).items():
        expected = np.array([float.fromhex(h) for h in PINNED[dtype][name]])
        if exact:
            np.testing.assert_array_equal(got.astype(np.float64), expected, err_msg=name)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=name)
