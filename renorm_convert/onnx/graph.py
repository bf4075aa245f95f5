"""Reading and editing an ONNX graph for `onnx_folding`: attributes,
constants (initializers and Constant nodes), consumers, shapes (only `onnx`
and NumPy)."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

_FLOATS = (np.float16, np.float32, np.float64)


# --- reading the graph -------------------------------------------------------

def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value):
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def compose_step(scale, offset, kind, value):
    """(scale, offset) of `x * scale + offset` followed by one step of
    constant arithmetic: kind "mul", "div", "add", "sub" (x - value) or
    "sub_from" (value - x)."""
    if kind == "mul":
        return scale * value, offset * value
    if kind == "div":
        return scale / value, offset / value
    if kind == "add":
        return scale, offset + value
    if kind == "sub":
        return scale, offset - value
    return -scale, value - offset  # sub_from


def _subgraphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _subgraph_refs(graph, refs):
    """Adds to `refs` every value name a node of `graph` (and its own
    subgraphs) reads."""
    for node in graph.node:
        refs.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            _subgraph_refs(sub, refs)


def _constant_node_value(node):
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), np.float32)
    return None


class _Graph:
    """The main graph of a model as a Python list of nodes, with indices
    rebuilt after every change, constants read lazily (and cached) and the
    value shapes from ONNX shape inference."""

    def __init__(self, model, shapes=True):
        self.model = model
        graph = model.graph
        self.nodes = []
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            self.nodes.append(copy)
        inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer
                             if t.name not in inputs}
        self.graph_inputs = inputs
        self.outputs = {o.name for o in graph.output}
        self.new_initializers = {}
        self.touched = set()  # constants that folds may have orphaned
        self.stale = set()  # values whose shape changed: their info goes
        # The nodes taken out, by id (held, so that no new node gets the
        # id of one taken out).
        self.removed = {}
        self._cache = {}
        self.shapes = _shapes(model) if shapes else {}
        self.reindex()

    def reindex(self):
        self.producer, self.consumers = {}, {}
        self.constant_nodes = {}
        sub_refs = set()
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
            for sub in _subgraphs(node):
                _subgraph_refs(sub, sub_refs)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constant_nodes[node.output[0]] = node
        self.sub_refs = sub_refs

    def names(self):
        names = set(self.producer) | set(self.initializers) | set(
            self.new_initializers) | self.graph_inputs | self.outputs
        names |= set(self.consumers) | set(self._cache)
        return names

    def const(self, name):
        """The value of a constant, or None."""
        if not name:
            return None
        if name in self._cache:
            return self._cache[name]
        value = None
        if name in self.new_initializers:
            value = self.new_initializers[name]
        elif name in self.initializers:
            try:
                value = numpy_helper.to_array(self.initializers[name])
            except Exception:  # external data that cannot be read: unknown
                value = None
        elif name in self.constant_nodes:
            try:
                value = _constant_node_value(self.constant_nodes[name])
            except Exception:
                value = None
        self._cache[name] = value
        return value

    def uses(self, name):
        """How many times `name` is read (a graph output counts as a read,
        a read inside a subgraph too)."""
        return (len(self.consumers.get(name, ())) + (name in self.outputs)
                + (name in self.sub_refs))

    def sole_consumer(self, name):
        """The single node reading `name`, where it is read exactly once by a
        node of the main graph and is no graph output; else None."""
        if self.uses(name) != 1 or name in self.outputs or (
                name in self.sub_refs):
            return None
        return self.consumers[name][0]

    def fresh_name(self, base, suffix="folded"):
        taken = self.names()
        name, i = f"{base}_{suffix}", 1
        while name in taken:
            name, i = f"{base}_{suffix}_{i}", i + 1
        self._cache[name] = None  # taken from now on
        return name

    def add_constant(self, base, value, suffix="folded"):
        name = self.fresh_name(base, suffix)
        self.new_initializers[name] = value
        self._cache[name] = value
        return name

    def index(self, node):
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def alive(self, node):
        return id(node) not in self.removed

    def replace_uses(self, old, new):
        """Every read of `old` (in subgraphs too) reads `new`."""
        def visit(nodes):
            for node in nodes:
                for i, name in enumerate(node.input):
                    if name == old:
                        node.input[i] = new
                for sub in _subgraphs(node):
                    visit(sub.node)
        visit(self.nodes)

    def remove_affine(self, node, data):
        """Removes the affine `node`, its data input `data` taking its
        place."""
        out = node.output[0]
        self.touched.update(n for n in node.input if n and n != data)
        del self.nodes[self.index(node)]
        self.removed[id(node)] = node
        if out in self.outputs:
            # The graph output keeps its name: the producer of `data` (read
            # by nothing else) writes it.
            producer = self.producer.get(data)
            for i, name in enumerate(producer.output):
                if name == data:
                    producer.output[i] = out
            self.replace_uses(data, out)
            self.shapes.setdefault(out, self.shapes.get(data))
        else:
            self.replace_uses(out, data)
        self.reindex()

    def remove(self, node):
        """Takes out `node`, whose outputs nothing reads any more."""
        self.touched.update(n for n in node.input if n)
        del self.nodes[self.index(node)]
        self.removed[id(node)] = node
        self.reindex()

    def bypass(self, node, data):
        """Removes `node`, whose one output equals its input `data`: what
        read the output reads `data`. Where the output is a graph output,
        the producer of `data` writes it under the output's name instead;
        False (nothing changed) where that cannot be (`data` is a graph
        input, an initializer or a graph output itself)."""
        out = node.output[0]
        if out not in self.outputs:
            self.replace_uses(out, data)
            self.remove(node)
            return True
        producer = self.producer.get(data)
        if producer is None or data in self.outputs:
            return False
        for i, name in enumerate(producer.output):
            if name == data:
                producer.output[i] = out
        self.replace_uses(data, out)
        self.shapes.setdefault(out, self.shapes.get(data))
        self.remove(node)
        return True

    def finish(self):
        """Writes the nodes and new constants back into the model, without
        the constants the folds orphaned."""
        graph = self.model.graph
        reads = set(self.outputs)
        for node in self.nodes:
            reads.update(node.input)
            for sub in _subgraphs(node):
                _subgraph_refs(sub, reads)
        keep = [n for n in self.nodes if not (
            n.op_type == "Constant" and n.output[0] in self.touched
            and n.output[0] not in reads)]
        del graph.node[:]
        graph.node.extend(keep)
        initializers = [t for t in graph.initializer if t.name in reads or (
            t.name not in self.touched) or t.name in self.graph_inputs]
        initializers += [numpy_helper.from_array(np.ascontiguousarray(v), n)
                         for n, v in self.new_initializers.items()
                         if n in reads]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        alive = {n for node in keep for n in node.output} | self.graph_inputs \
            | {t.name for t in initializers} | self.outputs
        infos = [v for v in graph.value_info
                 if v.name in alive and v.name not in self.stale]
        del graph.value_info[:]
        graph.value_info.extend(infos)


def _shapes(model):
    """name -> tuple of dims (int, or None where unknown), for every value
    whose rank ONNX shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # too large, or an op it does not know: no shapes
        inferred = model
    shapes = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(
            graph.output):
        t = value.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField(
                "shape"):
            continue
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else None
            for d in t.tensor_type.shape.dim)
    for t in graph.initializer:
        shapes.setdefault(t.name, tuple(t.dims))
    return shapes


# --- per-channel constants ---------------------------------------------------
