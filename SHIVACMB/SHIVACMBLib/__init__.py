"""SHIVA-CMB core: find cerebral microbleeds in T2*-GRE and SWI scans (pure Python, no Slicer).

The pipeline of one scan is :func:`SHIVACMBLib.pipeline.segment`; the command line is
:mod:`SHIVACMBLib.cli` (``shivacmb``).
"""

__version__ = "0.1.0"
