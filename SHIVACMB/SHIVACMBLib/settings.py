"""A scan's settings, declared once: how one scan is segmented, whatever the front end.

:class:`ScanSettings` holds every option of how a scan is processed (model, device, threshold,
size limits, location, candidate filter, outputs, DICOM results), with its default, its validation, its
command-line wording, whether it decides if a finished result can be reused (the batch resume
fingerprint) and, for the options the Slicer module shows, its parameter-node wording. The
`segment`, `batch` and `compare` parsers, the pipeline, the batch fingerprint, the Slicer
command lines and the Slicer parameter node are all made from these fields, so adding an
option is one field here (plus its wording). Imports only the standard library: Slicer
reads it at start-up.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def probability(text: Any) -> float:
    """A probability strictly between 0 and 1 (argparse type; ArgumentTypeError otherwise)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def volume(text: Any) -> float:
    """A non-negative number (argparse type; ArgumentTypeError otherwise)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


@dataclass(frozen=True)
class Gui:
    """How the Slicer module shows a setting: a parameter-node field ``kind`` ("str", "bool", "choice" or
    "range" with ``bounds``) and its default there (its widget is in Resources/UI/SHIVACMB.ui)."""

    kind: str
    default: Any
    bounds: Tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Option:
    """The command-line wording of a setting, and whether it decides if a result can be reused."""

    flag: str  # "--threshold"; a bool setting that is on by default is switched off by this flag
    help: str
    metavar: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None  # argparse type
    choices: Optional[Sequence[str]] = None
    reuse: bool = True  # part of the batch fingerprint: a result made otherwise is made again
    gui: Optional[Gui] = None  # shown by the Slicer module (parameter node)


def setting(default: Any, option: Option) -> Any:
    """A ScanSettings field."""
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class ScanSettings:
    """How one scan is segmented (every front end's options); validated when made."""

    model: Optional[str] = setting(None, Option(
        "--model", "installed model name or model folder (default: the embedded default model)", "NAME|DIR",
        gui=Gui("str", "")))
    device: str = setting("auto", Option(
        "--device", "where the network runs; a GPU that fails falls back to CPU; tensorrt builds engines once "
                    "(minutes) and caches them (default: %(default)s)", choices=DEVICES, reuse=False,
        gui=Gui("choice", "auto")))
    precision: str = setting("fp32", Option(
        "--precision", "fp16: half precision on NVIDIA GPUs; bf16 (OpenVINO, CPUs with AMX or AVX-512 BF16) and "
                       "int8 (CPUs, fastest with VNNI or AMX): used only once `shivacmb models verify MODEL "
                       "--precision P` has shown on this computer that they find what fp32 finds; elsewhere fp32 "
                       "runs, with a warning (default: %(default)s)", choices=PRECISIONS, gui=Gui("choice", "fp32")))
    threshold: Optional[float] = setting(None, Option(
        "--threshold", "probability threshold, 0-1 (default: the model's own, usually 0.5)", "T", probability,
        gui=Gui("range", 0.5, (0.001, 0.999))))
    min_volume_mm3: float = setting(0.0, Option(
        "--min-volume", "drop CMBs smaller than this, in mm^3 on the model grid (default: keep all)", "MM3", volume))
    max_volume_mm3: Optional[float] = setting(None, Option(
        "--max-volume", "drop CMBs larger than this, in mm^3 on the model grid (default: keep all)", "MM3", volume))
    location: bool = setting(True, Option(
        "--no-location", "skip the anatomical location (region, mars_area and side stay n/a)"))
    fp_filter: Optional[str] = setting(None, Option(
        "--fp-filter", "candidate filter: a second network that rejects candidates looking like veins, "
                       "calcifications or anatomy, after any model; a filter folder, or none to switch it off "
                       "(default: the embedded filter, where the installation has one)", "DIR|none"))
    save_probability: bool = setting(False, Option(
        "--save-probability", "also write cmb_probability (ensemble probability on the scan's grid)"))
    report: bool = setting(True, Option("--no-report", "do not write report.html"))
    dicom: bool = setting(True, Option(
        "--no-dicom", "do not write cmb.seg.dcm and cmb.sr.dcm (DICOM Segmentation and measurement report) for a "
                      "scan read from, or converted from, a DICOM series"))

    def __post_init__(self) -> None:
        for item in scan_fields():
            option: Option = item.metadata["option"]
            value = getattr(self, item.name)
            if option.choices is not None and value not in option.choices:
                raise ValueError(f"{item.name} must be one of {', '.join(option.choices)}, not '{value}'")
            if option.parse is not None and value is not None:
                try:
                    option.parse(value)
                except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
                    raise ValueError(f"{item.name} {err}") from None

    def values(self) -> Dict[str, Any]:
        """Every scan setting by field name."""
        return {item.name: getattr(self, item.name) for item in scan_fields()}

    def reuse_values(self) -> Dict[str, Any]:
        """The settings that decide whether a finished result can be reused (the device does not: a GPU and a
        CPU give the same CMBs); the batch puts the model's and filter's checksums in place of their names."""
        return {item.name: getattr(self, item.name) for item in scan_fields() if item.metadata["option"].reuse}

    def command_args(self) -> List[str]:
        """The command-line options giving these settings (defaults left out)."""
        args: List[str] = []
        for item in scan_fields():
            option: Option = item.metadata["option"]
            value = getattr(self, item.name)
            if value == item.default:
                continue
            if isinstance(item.default, bool):
                args.append(option.flag)
            else:
                args += [option.flag, str(value)]
        return args


def scan_fields() -> Tuple[Any, ...]:
    """The dataclass fields of :class:`ScanSettings`, in command-line order."""
    return fields(ScanSettings)


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    """One argparse option per scan setting (dest = the field name)."""
    for item in scan_fields():
        option: Option = item.metadata["option"]
        if isinstance(item.default, bool):
            action = "store_false" if item.default else "store_true"
            parser.add_argument(option.flag, dest=item.name, action=action, help=option.help)
            continue
        parser.add_argument(option.flag, dest=item.name, default=item.default, metavar=option.metavar,
                            type=option.parse, choices=option.choices, help=option.help)


def settings_from_args(args: argparse.Namespace, cls: type = ScanSettings, **extra: Any) -> Any:
    """``cls`` (ScanSettings or a subclass) from parsed options, with ``extra`` fields."""
    return cls(**{item.name: getattr(args, item.name) for item in scan_fields()}, **extra)


def gui_fields() -> List[Tuple[str, Gui, Optional[Sequence[str]]]]:
    """(field name, how the module shows it, its choices) of every setting the Slicer module shows."""
    return [(item.name, item.metadata["option"].gui, item.metadata["option"].choices) for item in scan_fields()
            if item.metadata["option"].gui is not None]


def settings_from_gui(values: Dict[str, Any], **overrides: Any) -> ScanSettings:
    """ScanSettings from the module's parameter values (an empty text means the setting is not given)."""
    return ScanSettings(**{name: None if values[name] == "" else values[name] for name, _, _ in gui_fields()},
                        **overrides)
