"""Development tools: phantom generators (procedural, atlas and out-of-distribution heads), the demo, and
training of the U-Net and the candidate filter. The segmenting pipeline and the Slicer module never import them."""
