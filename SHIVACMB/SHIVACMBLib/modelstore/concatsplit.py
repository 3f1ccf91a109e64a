"""A convolution of a channel Concat (a U-Net's upsampled tensor and its skip) as a sum of convolutions, for OpenVINO.

On AVX-512 CPUs OpenVINO lays channels out in blocks of 16; the decoder's concatenations (16 + 8 channels in the
SHIVA-sized stand-in) do not fit them and run with its reference kernel (4 % of the network time, each one a copy
of a full-resolution tensor). ``Conv(Concat(a, b), W) = Conv(a, W[:, :A]) + Conv(b, W[:, A:])``: the same sums, in
another order (float rounding), without the copy; OpenVINO adds the second convolution's result as it computes it.
:func:`split_concat_convs` does it where every reader of the Concat is such a Conv; other graphs are left as they were.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .upsampling import drop_unused


def split_concat_convs(proto: Any) -> int:
    """Rewrite in place every channel Concat of ``proto`` read only by plain Convs with constant weights as sums of
    Convs of its inputs; the number of Concats removed."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value
                for v in onnx.shape_inference.infer_shapes(proto, data_prop=True).graph.value_info
                if len(v.type.tensor_type.shape.dim) > 2}
    channels.update({v.name: v.type.tensor_type.shape.dim[1].dim_value for v in graph.input
                     if len(v.type.tensor_type.shape.dim) > 2})
    weights = {i.name: i for i in graph.initializer}
    readers: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kept = {o.name for o in graph.output}
    split = 0
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        convs = readers.get(concat.output[0], [])
        counts = [channels.get(name, 0) for name in concat.input]
        axis = {a.name: a.i for a in concat.attribute}.get("axis")
        if axis != 1 or not convs or not all(counts) or concat.output[0] in kept \
                or not all(_plain_conv(c, concat.output[0], weights, sum(counts)) for c in convs):
            continue
        ends = np.cumsum([0, *counts])
        for conv in convs:
            kernel = numpy_helper.to_array(weights[conv.input[1]])
            parts, sums = [], []
            for index, name in enumerate(concat.input):
                part = f"{conv.name or conv.output[0]}/part{index}"
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(kernel[:, ends[index]:ends[index + 1]]), f"{part}/W"))
                bias = list(conv.input[2:3]) if index == 0 else []
                parts.append(helper.make_node("Conv", [name, f"{part}/W", *bias], [f"{part}:0"], name=part))
                parts[-1].attribute.extend(conv.attribute)
            total = parts[0].output[0]
            for index, part in enumerate(parts[1:], 1):
                out = conv.output[0] if index == len(parts) - 1 else f"{part.name}/sum:0"
                sums.append(helper.make_node("Add", [total, part.output[0]], [out], name=f"{part.name}/sum"))
                total = out
            position = list(graph.node).index(conv)
            graph.node.remove(conv)
            for offset, node in enumerate(parts + sums):
                graph.node.insert(position + offset, node)
        graph.node.remove(concat)
        split += 1
    if split:
        drop_unused(graph)
    return split


def _plain_conv(node: Any, source: str, weights: Dict[str, Any], channels: int) -> bool:
    """Whether ``node`` is a Conv of ``source`` (and nothing else) with constant weights over all its channels."""
    groups = {a.name: a.i for a in node.attribute}.get("group", 1)
    return node.op_type == "Conv" and groups == 1 and list(node.input[:1]) == [source] \
        and source not in node.input[1:] and len(node.input) > 1 and node.input[1] in weights \
        and len(weights[node.input[1]].dims) > 1 and weights[node.input[1]].dims[1] == channels
