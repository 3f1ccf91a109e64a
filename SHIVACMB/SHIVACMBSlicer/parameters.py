"""The parameter node's scan settings: a field for each setting of SHIVACMBLib.settings the module shows."""

from typing import Annotated, Any, Optional, Sequence

from slicer.parameterNodeWrapper import Choice, WithinRange

from SHIVACMBLib.settings import Gui, ScanSettings, gui_fields, settings_from_gui


def annotation(gui: Gui, choices: Optional[Sequence[str]]) -> Any:
    """The parameter-node type of a setting as the module shows it."""
    if gui.kind == "choice":
        return Annotated[str, Choice(list(choices or ()))]
    if gui.kind == "range":
        return Annotated[float, WithinRange(*gui.bounds)]
    return {"str": str, "bool": bool}[gui.kind]


def withScanSettings(cls: type) -> type:
    """Add the shown scan settings to a parameter node class, before @parameterNodeWrapper reads it."""
    for name, gui, choices in gui_fields():
        cls.__annotations__[name] = annotation(gui, choices)
        setattr(cls, name, gui.default)
    return cls


def scanSettings(parameterNode: Any, **overrides: Any) -> ScanSettings:
    """The scan settings a parameter node holds (``overrides`` for those the module does not show)."""
    return settings_from_gui({name: getattr(parameterNode, name) for name, _, _ in gui_fields()}, **overrides)
