"""Model files written by an earlier release still load and give the same galaxies (docs/compatibility.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hpcvae.errors import CheckpointError

FIXTURE = Path(__file__).parent / "data" / "models" / "galaxy_film-debug-32"
CATALOG = {"zphot": np.array([0.3, 1.1]), "mag_auto": np.array([20.5, 22.5])}


@pytest.mark.parametrize("prior", ["normal", "flow"])
def test_a_stored_model_gives_its_stored_samples(prior):
    import hpcvae

    model = hpcvae.load_model(FIXTURE)
    got = model.sample(CATALOG, seed=7, prior=prior).numpy()
    want = np.load(FIXTURE / f"expected_{prior}.npy")
    assert got.shape == want.shape == (2, 1, 32, 32)
    # Same seed, same weights: equal up to the last bits a different BLAS may round differently.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_fields_added_later_take_their_old_defaults(tmp_path):
    """A file without write_id (0.1) loads; the pair check only applies when both files carry one."""
    import hpcvae

    folder = shutil.copytree(FIXTURE, tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta.pop("write_id", None)
    (folder / "model.json").write_text(json.dumps(meta))
    got = hpcvae.load_model(folder).sample(CATALOG, seed=7, prior="normal").numpy()
    np.testing.assert_allclose(got, np.load(FIXTURE / "expected_normal.npy"), rtol=0, atol=1e-5)


def test_another_format_tag_is_refused_in_one_line(tmp_path):
    import hpcvae

    folder = shutil.copytree(FIXTURE, tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta["format"] = "hpcvae-model/2"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format") as err:
        hpcvae.load_model(folder)
    assert "\n" not in str(err.value)


def test_the_fixture_conditions_are_refused_outside_their_training_range():
    import hpcvae

    model = hpcvae.load_model(FIXTURE)
    with pytest.raises(Exception, match="zphot") as err:
        model.sample({"zphot": np.array([5.0]), "mag_auto": np.array([21.0])}, seed=0)
    assert "\n" not in str(err.value)
    model.sample({"zphot": np.array([5.0]), "mag_auto": np.array([21.0])}, seed=0, extrapolate=True)
