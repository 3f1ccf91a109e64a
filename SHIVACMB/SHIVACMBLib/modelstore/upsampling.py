"""Keras ``UpSampling3D`` as tf2onnx converts it, rewritten as one nearest-neighbour ``Resize`` for OpenVINO.

tf2onnx turns each Keras ``UpSampling3D`` into three ``Repeat``s, one per axis (Unsqueeze -> Tile -> Reshape each),
with Transposes between Keras's channels-last layout and the channels-first convolutions around them, then crops
and transposes back (the SHIVA-sized stand-in: 12 Tile, 8 Transpose, 14 Reshape, 12 Unsqueeze). OpenVINO runs each
as a copy of an ever larger tensor. :func:`resize_upsamplings` follows every chain of such layout operations
(Unsqueeze, Tile, Transpose, Reshape, Slice) from the tensor it starts at, keeping for each dimension the input
axis it reads and by which whole factor it repeats it; a chain that ends with every input axis repeated
element-wise, possibly cropped and permuted, becomes ``Resize`` (nearest, asymmetric, floor: output index ``i``
reads input index ``i // factor``, exactly) [-> Slice] [-> Transpose]: the same numbers, no transposes where the
permutation comes back to the input's (3 % of the stand-in's OpenVINO time, docs/performance.md). Reshape
targets computed from Shape nodes (converted SavedModels) are read from shape inference. Chains it cannot follow
so are left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

LAYOUT_OPS = {"Unsqueeze", "Tile", "Transpose", "Reshape", "Slice"}
RESIZE_OPSET = 13  # Resize with an empty roi and integer-exact nearest modes


class NotUpsampling(Exception):
    """The chain does not compute a nearest-neighbour upsampling the rewrite can follow."""


@dataclass(frozen=True)
class Dim:
    """One dimension of a tensor in a chain: ``axis`` of the chain's input repeated ``factor`` times per element,
    ``start`` elements cropped off its front; ``axis`` None: a new dimension (``size`` 1, or copies made by Tile)."""

    axis: Optional[int]
    size: int
    factor: int = 1
    start: int = 0
    cropped: bool = False


@dataclass
class Chain:
    """Layout nodes, in order, whose last output is an upsampling of the first one's input (``dims``)."""

    nodes: List[Any]
    dims: List[Dim]
    sizes: List[Tuple[int, ...]]  # each node's output shape


def resize_upsamplings(proto: Any) -> int:
    """Rewrite every upsampling chain of ``proto`` (an ``onnx.ModelProto`` with static shapes) in place as a
    ``Resize``; the number of chains rewritten. Graphs whose opset predates ``Resize``'s are left alone."""
    import onnx

    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < RESIZE_OPSET:
        return 0
    graph = proto.graph
    # data propagation: the Reshape targets a SavedModel's graph computes from Shape nodes become static too
    shapes = _static_shapes(onnx.shape_inference.infer_shapes(proto, data_prop=True).graph)
    constants = _constants(graph)
    users: Dict[str, List[Any]] = {}  # the nodes reading each tensor, its Shape nodes left out
    for node in graph.node:
        for name in node.input if node.op_type != "Shape" else ():
            users.setdefault(name, []).append(node)
    kept = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    rewritten = 0
    for node in list(graph.node):
        source = node.input[0] if node.input else ""
        before = producers.get(source)
        if node.op_type not in LAYOUT_OPS or (before is not None and before.op_type in LAYOUT_OPS
                                               and len(users[source]) == 1):
            continue  # inside a chain, not where one starts
        chain = _follow(node, shapes.get(source), constants, users, kept, shapes)
        if chain:
            _replace(graph, chain, source, f"{chain.nodes[0].name or chain.nodes[0].output[0]}/resize")
            rewritten += 1
    if rewritten:
        drop_unused(graph)
    return rewritten


def _static_shapes(graph: Any) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of ``graph`` whose shape inference left a fully static shape."""
    shapes = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def _constants(graph: Any) -> Dict[str, np.ndarray]:
    """The initializers and Constant nodes of ``graph``, as arrays."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _follow(first: Any, shape: Optional[Tuple[int, ...]], constants: Dict[str, np.ndarray],
            users: Dict[str, List[Any]], kept: Set[str], shapes: Dict[str, Tuple[int, ...]]) -> Optional[Chain]:
    """The longest chain from ``first`` that upsamples its input; None if there is none."""
    if not shape:
        return None
    dims = [Dim(axis, size) for axis, size in enumerate(shape)]
    nodes: List[Any] = []
    sizes: List[Tuple[int, ...]] = []
    best = None
    node = first
    while True:
        try:
            dims = _apply(node, dims, constants, shapes)
        except (NotUpsampling, KeyError, IndexError, TypeError, ValueError):
            return best
        if shapes.get(node.output[0], tuple(d.size for d in dims)) != tuple(d.size for d in dims):
            return best
        nodes.append(node)
        sizes.append(tuple(d.size for d in dims))
        if _upsamples(dims, len(shape)):
            best = Chain(list(nodes), dims, list(sizes))
        readers = users.get(node.output[0], [])
        if node.output[0] in kept or len(readers) != 1 or readers[0].op_type not in LAYOUT_OPS \
                or list(readers[0].input[:1]) != [node.output[0]] or len(node.output) != 1:
            return best
        node = readers[0]


def _upsamples(dims: Sequence[Dim], rank: int) -> bool:
    """Whether ``dims`` read each of the input's ``rank`` axes once, at least one repeated."""
    return sorted(d.axis for d in dims if d.axis is not None) == list(range(rank)) and len(dims) == rank \
        and any(d.factor > 1 for d in dims)


def _apply(node: Any, dims: List[Dim], constants: Dict[str, np.ndarray], shapes: Dict[str, Tuple[int, ...]]
           ) -> List[Dim]:
    """``dims`` after ``node``; NotUpsampling where the result is not an element-wise repeat of the input, KeyError
    where it depends on something not constant."""
    if node.op_type == "Reshape":  # its static output shape says all, however its target is computed
        return _reshaped(dims, shapes[node.output[0]])
    attributes = {a.name: a for a in node.attribute}
    operands = [constants[name] for name in node.input[1:] if name]
    if node.op_type == "Unsqueeze":
        axes = np.ravel(operands[0] if operands else attributes["axes"].ints)
        out = list(dims)
        for axis in sorted(int(a) % (len(dims) + len(axes)) for a in axes):
            out.insert(axis, Dim(None, 1))
        return out
    if node.op_type == "Tile":
        repeats = [int(r) for r in np.ravel(operands[0])]
        if len(repeats) != len(dims) or any(r != 1 and (d.axis is not None or d.size != 1)
                                            for d, r in zip(dims, repeats)):
            raise NotUpsampling("Tile of a dimension that holds data")
        return [replace(d, size=r) if r != 1 else d for d, r in zip(dims, repeats)]
    if node.op_type == "Transpose":
        perm = list(attributes["perm"].ints) if "perm" in attributes else list(range(len(dims)))[::-1]
        return [dims[p] for p in perm]
    return _sliced(dims, operands)


def _reshaped(dims: List[Dim], target: Sequence[int]) -> List[Dim]:
    """``dims`` after a Reshape to ``target`` that only merges a data dimension with the copies Tile made of it."""
    held = [d for d in dims if d.axis is not None or d.size > 1]  # new size-1 dimensions carry nothing
    out, index = [], 0
    for size in target:
        if size == 1:
            single = index < len(held) and held[index].size == 1
            out.append(held[index] if single else Dim(None, 1))
            index += single
            continue
        group, product = [], 1
        while product < size and index < len(held):
            group.append(held[index])
            product *= held[index].size
            index += 1
        if product != size:
            raise NotUpsampling("Reshape that splits a dimension")
        out.append(_merged(group))
    if index != len(held):
        raise NotUpsampling("Reshape that drops a dimension")
    return out


def _merged(group: List[Dim]) -> Dim:
    """One dimension made of ``group``: a data dimension followed by Tile's copies of each of its elements."""
    if len(group) == 1:
        return group[0]
    data, copies = group if len(group) == 2 else (None, None)
    if data is None or data.axis is None or data.cropped or copies.axis is not None:
        raise NotUpsampling("Reshape that is not an element-wise repeat")
    return replace(data, size=data.size * copies.size, factor=data.factor * copies.size)


def _sliced(dims: List[Dim], operands: List[np.ndarray]) -> List[Dim]:
    """``dims`` after a Slice of constant starts, ends, axes and unit steps: crops of data dimensions."""
    starts, ends = (np.ravel(o).astype(np.int64) for o in operands[:2])
    axes = np.ravel(operands[2]) if len(operands) > 2 else np.arange(len(starts))
    steps = np.ravel(operands[3]) if len(operands) > 3 else np.ones(len(starts), np.int64)
    out = list(dims)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = out[int(axis) % len(dims)]
        begin, stop, _ = slice(int(start), int(end)).indices(dim.size)
        if step != 1 or stop <= begin:
            raise NotUpsampling("Slice with steps or an empty result")
        if (begin, stop) == (0, dim.size):
            continue
        if dim.axis is None:
            raise NotUpsampling("Slice of Tile's copies")
        out[int(axis) % len(dims)] = replace(dim, size=stop - begin, start=dim.start + begin, cropped=True)
    return out


def _replace(graph: Any, chain: Chain, source: str, name: str) -> None:
    """Put Resize [-> Slice] [-> Transpose] computing ``chain`` from ``source`` in its place; the Shape nodes that
    read a tensor inside it become constants."""
    from onnx import helper, numpy_helper

    dims = chain.dims
    by_axis = sorted(dims, key=lambda d: d.axis)
    result = chain.nodes[-1].output[0]
    perm = [d.axis for d in dims]
    steps = [("Slice", any(d.cropped for d in dims)), ("Transpose", perm != sorted(perm))]
    outputs = [f"{name}:0"] + [f"{name}/{op}:0" for op, needed in steps if needed]
    outputs[-1] = result

    def constant(suffix: str, values: Sequence[Any], dtype: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype), f"{name}/{suffix}"))
        return f"{name}/{suffix}"

    nodes = [helper.make_node("Resize", [source, "", constant("scales", [d.factor for d in by_axis], np.float32)],
                              [outputs[0]], name=name, mode="nearest", nearest_mode="floor",
                              coordinate_transformation_mode="asymmetric")]
    if steps[0][1]:
        starts = constant("starts", [d.start for d in by_axis], np.int64)
        ends = constant("ends", [d.start + d.size for d in by_axis], np.int64)
        nodes.append(helper.make_node("Slice", [outputs[0], starts, ends], [outputs[1]], name=f"{name}/Slice"))
    if steps[1][1]:
        nodes.append(helper.make_node("Transpose", [nodes[-1].output[0]], [result], name=f"{name}/Transpose",
                                      perm=perm))
    inside = {node.output[0]: shape for node, shape in zip(chain.nodes[:-1], chain.sizes)}
    for index, node in enumerate(graph.node):
        if node.op_type == "Shape" and node.input[0] in inside:
            bounds = {a.name: a.i for a in node.attribute}
            value = np.array(inside[node.input[0]][bounds.get("start", 0):bounds.get("end")], np.int64)
            graph.node[index].CopyFrom(helper.make_node("Constant", [], list(node.output), name=node.name,
                                                        value=numpy_helper.from_array(value)))
    position = list(graph.node).index(chain.nodes[0])
    for node in chain.nodes:
        graph.node.remove(node)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def drop_unused(graph: Any) -> None:
    """Remove the nodes, constants and shapes of ``graph`` that no longer lead to an output."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not read & set(node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    made = {name for node in graph.node for name in node.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    for value in [v for v in graph.value_info if v.name not in made]:
        graph.value_info.remove(value)
