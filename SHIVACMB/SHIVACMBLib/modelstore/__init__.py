"""The model store: model descriptors and the registry, installing and converting TensorFlow/Keras weights,
parity checks, reduced-precision copies, and the fixed-weight test models."""
