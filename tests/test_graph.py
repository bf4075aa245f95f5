"""model_graph: call sites, nesting, shared layers, input order."""

import keras
import networkx as nx
import pytest

import renorm_convert as rc
from helpers import nested_model


def test_nested_model_graph():
    model = nested_model()
    g = rc.model_graph(model)
    assert isinstance(g, nx.MultiDiGraph)
    assert nx.is_directed_acyclic_graph(g)
    paths = {d["path"] for _, d in g.nodes(data=True)}
    assert {"inner/inner_bn", "seq/seq_bn", "shared_bn", "join_bn",
            "image_a", "image_b"} <= paths
    # The nested submodel is called twice: its layers appear at two sites.
    inner_bn = [n for n, d in g.nodes(data=True) if d["path"] == "inner/inner_bn"]
    assert len(inner_bn) == 2
    shared = [n for n, d in g.nodes(data=True) if d["name"] == "shared_bn"]
    assert len(shared) == 2
    assert g.nodes[shared[0]]["layer"] is g.nodes[shared[1]]["layer"]
    assert sorted(g.nodes[n]["call"] for n in shared) == [0, 1]
    # Edges keep input order: join gets branch a first, then branch b.
    join = g.nodes["join"]
    assert join["inputs"] == [shared[0], shared[1]] or join["inputs"] == [
        n for n in shared if g.nodes[n]["call"] == 0] + [
        n for n in shared if g.nodes[n]["call"] == 1]
    idx = {src: d["input_index"] for src, _, d in g.in_edges("join", data=True)}
    assert sorted(idx.values()) == [0, 1]
    # The inner conv's first call reads image_a straight from the input node.
    conv_calls = sorted((n for n, d in g.nodes(data=True)
                         if d["path"] == "inner/inner_conv"),
                        key=lambda n: g.nodes[n]["call"])
    assert g.nodes[conv_calls[0]]["inputs"] == ["input:image_a"]
    assert g.nodes[conv_calls[1]]["inputs"] == ["input:image_b"]
    # Sequential layers are chained: seq_bn reads seq_dense.
    assert g.nodes["seq/seq_bn"]["inputs"] == ["seq/seq_dense"]
    assert g.nodes["seq/seq_dense"]["inputs"] == ["head_dense"]
    outs = g.graph["outputs"]
    assert [n for n, _ in outs] == ["probs", "score"]


def test_edge_order_for_non_commutative_op():
    a = keras.Input((3,), name="a")
    b = keras.Input((3,), name="b")
    out = keras.layers.Subtract(name="sub")([b, a])
    g = rc.model_graph(keras.Model([a, b], out))
    assert g.nodes["sub"]["inputs"] == ["input:b", "input:a"]


def test_counts_match_keras_applications():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                        classes=10)
    g = rc.model_graph(model)
    n_layers = len(model.layers)  # no shared layers, no nesting
    assert g.number_of_nodes() == n_layers
    bns = rc.graph.normalization_nodes(g)
    assert len(bns) == 53
    assert all(g.nodes[g.nodes[n]["inputs"][0]]["class_name"] == "Conv2D"
               for n in bns)


def test_subclassed_model_has_no_graph():
    class M(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(rc.RenormConvertError, match="subclassed"):
        rc.model_graph(M())
