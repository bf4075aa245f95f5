"""`.keras` files written by earlier versions and on other backends load on
this one with their weights, renorm statistics, bounds and microbatches
(tests/data/make_fixture.py wrote them)."""

import os

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import max_rel_diff

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FILES = sorted(f[:-len(".keras")] for f in os.listdir(DATA)
               if f.endswith(".keras"))


def test_fixtures_are_there():
    assert {"renorm-0.1-tensorflow", "renorm-0.2-jax"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_file_loads_with_the_same_outputs(name):
    expected = np.load(os.path.join(DATA, name + ".npz"))
    model = rc.load(os.path.join(DATA, name + ".keras"))
    layers = rc.renorm_layers(model)
    assert [l.name for l in layers] == ["bn", "bn_dense"]
    for layer in layers:
        assert (layer.r_max, layer.d_max, layer.microbatch_size) == (
            2.0, 1.5, 2)
    assert max_rel_diff(expected["y"],
                        model(expected["x"], training=False)) <= 1e-5
    # Training mode reads the renorm statistics and the bounds as well.
    assert max_rel_diff(expected["y_train"],
                        model(expected["x_train"], training=True)) <= 1e-4


@pytest.mark.parametrize("name", FILES)
def test_file_saves_again_and_loads(name, tmp_path):
    model = rc.load(os.path.join(DATA, name + ".keras"))
    expected = np.load(os.path.join(DATA, name + ".npz"))
    path = tmp_path / "again.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert max_rel_diff(expected["y"],
                        again(expected["x"], training=False)) <= 1e-5
