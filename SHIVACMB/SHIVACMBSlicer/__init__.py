"""The Slicer side of SHIVA-CMB: one file per section of the module panel (imports slicer, qt and vtk).

SHIVACMB.py is the entry Slicer loads (module, parameter node, widget and logic facades, self-test);
the facades are made of the classes here:

- ``nodes``: the MRML nodes the module makes (result attributes, tables, positions, terminology);
- ``command``: a command run in the background and followed from the Qt event loop, started once;
- ``packages``: Python packages installed into Slicer, and the model selector;
- ``segment``: segmenting a scan and showing its results;
- ``correcting``: corrections in the Segment Editor and the findings table, saving them;
- ``rating``: rating sessions;
- ``comparison``: follow-up against baseline;
- ``parameters``: the parameter node's scan settings (SHIVACMBLib.settings);
- ``selftest``: the test Slicer runs.

What needs no Slicer is in SHIVACMBLib (slicerside/ and the core) and is tested with pytest.
"""

import importlib
import sys

# Dependency order: a module is reloaded after the modules it imports.
SUBMODULES = ("nodes", "parameters", "command", "packages", "segment", "correcting", "rating", "comparison",
              "selftest")


def reloadSubmodules() -> None:
    """Reload every section (Slicer's Reload button reloads only SHIVACMB.py)."""
    for name in SUBMODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
