"""The ``shivacmb`` command.

Exit codes: 0 done, 2 bad input or usage, 3 model problem, 4 runtime failure, 130 cancelled.
Errors are one line on stderr: ``shivacmb: error: <file>: <problem>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import __version__
from .errors import ERROR_PREFIX, Cancelled, ShivaError
from .dicomsend import add_send_options, destination_from_args, send_results
from .modelstore.commands import models_convert, models_install, models_list, models_verify
from .modelstore.precisions import HELDOUT_PHANTOMS
from .progress import PROGRESS_MODES
from .settings import DEVICES, PRECISIONS, add_scan_options, settings_from_args, volume

EPILOG = """exit codes: 0 done, 2 bad input or usage, 3 model problem, 4 runtime failure, 130 cancelled"""
SEND_DESCRIPTION = ("Send the DICOM objects that the results in and below RESULT_DIR list (the .dcm files of "
                    "their run.json, comparison.json or corrections.json) to a DICOM server, Segmentations first. "
                    "Each object sent is recorded in dicom_sent.json beside it: a rerun sends only what that server "
                    "has not received. A failure is one line and exit 4; the results stay as they are. See "
                    "docs/dicom.md.")


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _spacing(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a voxel size: {text}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0.2 <= v <= 5.0 for v in values):
        raise argparse.ArgumentTypeError(f"give one or three voxel sizes between 0.2 and 5 mm, not {text}")
    return values


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    """The scan's settings (SHIVACMBLib.settings), shared by `segment`, `batch` and `compare`, and --progress."""
    add_scan_options(parser)
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                        help="bar: progress bar on stderr; json: one JSON object per line on stdout "
                             "(for front ends); none (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shivacmb",
        description="Find cerebral microbleeds (CMBs) in T2*-GRE and SWI MRI with SHIVA-CMB-style 3D U-Nets "
                    "(ONNX). Results land in the scan's own grid.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shivacmb {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser(
        "segment", help="find the CMBs of one scan",
        description="Find the CMBs of one scan and write, into OUT/<scan-id>/: cmb_labels (label k = CMB k, in "
                    "the input's format), cmb.seg.nrrd (one Slicer segment per CMB), findings.tsv (one row per "
                    "CMB), run.json (provenance, timings, warnings) and report.html (QC thumbnails); for a DICOM "
                    "series (or --dicom-source), cmb.seg.dcm and cmb.sr.dcm (DICOM Segmentation and measurement "
                    "report, docs/dicom.md).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    seg.add_argument("input", metavar="INPUT",
                     help="scan: NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM "
                          "series folder; any orientation, spacing or obliquity")
    seg.add_argument("--mask", metavar="M", help="brain mask on any grid (voxels > 0 are brain); "
                                                 "computed from the scan when not given")
    seg.add_argument("--out", metavar="DIR", default="shivacmb_output",
                     help="output folder; results go to DIR/<scan-id>/ (default: %(default)s)")
    seg.add_argument("--scan-id", metavar="ID", help="name of the result folder (default: input file name)")
    seg.add_argument("--parcellation", metavar="P",
                     help="FreeSurfer (aseg, aparc+aseg, wmparc) or SynthSeg label map on any grid, for the MARS "
                          "location of each CMB (default: the shipped MNI atlas, registered to the scan)")
    seg.add_argument("--dicom-source", metavar="DIR",
                     help="the DICOM series a NIfTI/NRRD scan was converted from (dcm2niix...): cmb.seg.dcm and "
                          "cmb.sr.dcm are made against it, once its grid is found to be the scan's (a DICOM scan "
                          "gets them against its own series)")
    _add_scan_options(seg)
    seg.set_defaults(handler=_segment)

    batch = commands.add_parser(
        "batch", help="find the CMBs of a whole cohort (dask.distributed; resumable)",
        description="Segment every scan of a folder, a BIDS dataset or a CSV list on a dask.distributed cluster "
                    "(a local one sized to this machine by default). Each scan's outputs are those of `segment`, "
                    "in OUT/<scan-id>/ (a BIDS input gives a BIDS derivatives dataset: sub-*/ses-*/anat/"
                    "*_desc-cmb_*). Then OUT/cohort_summary.tsv (one row per scan), OUT/cohort_findings.tsv (every "
                    "CMB) and OUT/report.html (cohort plots, scans table, a link to each scan's QC page). A rerun "
                    "skips scans already done with the same input, model and settings; a scan that fails is "
                    "recorded with its error and the others go on.",
        epilog=EPILOG.replace("0 done,", "0 done, 1 finished with failed scans (see cohort_summary.tsv),"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("input", metavar="INPUT",
                       help="a folder (image files and DICOM series folders, recursive), a BIDS dataset "
                            "(*_T2starw, *_swi, *_GRE images) or a CSV/TSV with columns "
                            "scan_id,image[,mask][,parcellation] (paths relative to the list's folder)")
    batch.add_argument("--out", metavar="DIR", required=True, help="output folder")
    batch.add_argument("--bids-filter", action="append", default=[], metavar="ENTITY=VALUE[,VALUE]",
                       help="BIDS input: keep images with these entity values (repeatable), e.g. ses=01, "
                            "suffix=swi, acq=mag; phase/real/imaginary parts are left out unless part= is given")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on this existing dask scheduler (tcp://host:8786; see docs/cohorts.md for SLURM, "
                            "PBS, SGE) instead of a local cluster")
    batch.add_argument("--workers", type=_count, metavar="N",
                       help="local cluster: worker processes (default: one per NVIDIA GPU, else one per core, "
                            "one per two cores where OpenVINO runs the network, and at most one per 4 GiB of "
                            "memory)")
    batch.add_argument("--threads", type=_count, metavar="N",
                       help="threads of each worker's network and image filters (default: the local cores shared "
                            "among the workers; every core of a worker's machine on an existing cluster)")
    batch.add_argument("--retry-failed", action="store_true", help="rerun scans that failed in an earlier run")
    add_send_options(batch, command=False)
    _add_scan_options(batch)
    batch.set_defaults(handler=_batch)

    phantom = commands.add_parser(
        "phantom", help="make synthetic scans with known CMBs and mimics",
        description="Write N synthetic T2*-GRE/SWI head scans with known CMBs and CMB mimics (veins, "
                    "calcifications, iron, air-bone artefacts, flow voids): DIR/<id>.nii.gz, their ground truth "
                    "in DIR/truth/ (<id>_cmb.nii.gz: label k = CMB k; <id>_mimics.nii.gz; <id>_objects.tsv) and "
                    "an index DIR/phantoms.tsv. Seeds SEED..SEED+N-1; a rerun keeps finished scans.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    phantom.add_argument("--out", metavar="DIR", required=True, help="output folder")
    phantom.add_argument("--n", type=_count, default=1, metavar="N", help="number of scans (default: %(default)s)")
    phantom.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the first scan (default: %(default)s)")
    phantom.add_argument("--modality", choices=("swi", "t2s"), help="contrast (default: random per scan)")
    phantom.add_argument("--spacing", type=_spacing, metavar="MM[,MM,MM]",
                         help="voxel size, one value or three (default: random, 0.5-1 mm isotropic or "
                              "anisotropic up to 1x1x3 mm)")
    phantom.add_argument("--prefix", default="phantom", help="scan id prefix (default: %(default)s)")
    phantom.add_argument("--family", choices=("procedural", "atlas", "wide", "broad", "ood"), default="procedural",
                         help="procedural: geometric heads; atlas: heads made from the MNI tissue atlas with "
                              "randomised contrast, artefacts and skull stripping (training and validation); wide: "
                              "atlas heads with wider ranges and soft-edged CMBs (training); broad: wide heads with "
                              "contrast from both modalities' ranges, varying noise and CMBs beside CSF (training); ood: "
                              "the out-of-distribution test family, other contrast, noise and shapes "
                              "(default: %(default)s)")
    phantom.set_defaults(handler=_phantom)

    demo = commands.add_parser(
        "demo", help="run the default model on a phantom scan and score it",
        description="Make a phantom SWI scan with known CMBs, segment it with the embedded default model (a "
                    "demonstration model trained on synthetic phantoms, not for clinical or research reads), "
                    "score the result against the phantom's truth and say where the outputs are.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", metavar="DIR", default="shivacmb_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--model", metavar="NAME|DIR", help="model to run (default: the embedded default model)")
    demo.add_argument("--device", choices=DEVICES, default="auto", help="where the network runs (default: %(default)s)")
    demo.set_defaults(handler=_demo)

    models = commands.add_parser("models", help="list or verify installed models",
                                 description="Models are folders with model.json and ONNX folds, looked up in "
                                             "the user model folder (or $SHIVACMB_MODELS) and the embedded "
                                             "models/.")
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="installed models with modality, licence and location")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=models_list)
    verify = actions.add_parser("verify", help="check every fold file against its sha256 (and, with --parity, "
                                               "against the TensorFlow original)")
    verify.add_argument("models", nargs="*", metavar="NAME|DIR", help="models to verify (default: all installed)")
    verify.add_argument("--parity", action="store_true",
                        help="also run each converted fold and its TF original on a phantom scan and compare "
                             "(needs the `convert` extra)")
    verify.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16/bf16/int8: also run that precision on --device and compare it with fp32 there on "
                             "the demo phantom and --phantoms held-out phantoms: the same detections, probability "
                             "differences reported. int8 first makes the model's int8 copy (calibrated on phantoms). "
                             "A bf16 or int8 check is recorded for this computer: `segment --precision` uses that "
                             "precision only after one passed (default: %(default)s)")
    verify.add_argument("--device", choices=DEVICES, default="auto",
                        help="device of the precision check (default: %(default)s)")
    verify.add_argument("--phantoms", type=_count, default=HELDOUT_PHANTOMS, metavar="N",
                        help="held-out phantoms of the precision check, made once into the user cache folder "
                             "(default: %(default)s)")
    verify.add_argument("--scan", metavar="FILE", type=Path,
                        help="scan for the checks, instead of the phantoms (default: a phantom SWI scan)")
    verify.set_defaults(handler=models_verify)
    install = actions.add_parser(
        "install", help="install SHIVA-CMB TensorFlow/Keras weights (zip or folder) as an ONNX model",
        description="Install the official SHIVA-CMB weights as downloaded (zip or unpacked folder: a descriptor JSON "
                    "with an md5 per fold, Keras .h5 folds (v1) or SavedModel folders (v2)): check the zip's sha256 "
                    "(--sha256) and every md5, convert each fold to ONNX, check that each conversion computes what "
                    "its original computes on a phantom scan, and install into the user model folder. Needs the "
                    "`convert` extra: pip install 'shivacmb[convert]'.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    install.add_argument("source", metavar="ZIP|DIR", type=Path, help="the downloaded zip, or its unpacked folder")
    install.add_argument("--name", metavar="N", help="installed model name (default: shiva-cmb-<modalities>-<version>)")
    install.add_argument("--sha256", metavar="HEX", help="published sha256 of the zip, checked before anything else")
    install.add_argument("--force", action="store_true", help="replace an installed model of the same name")
    install.add_argument("--scan", metavar="FILE", type=Path, help="scan for the parity check (default: a phantom)")
    install.set_defaults(handler=models_install)
    convert = actions.add_parser(
        "convert", help="convert one Keras (.h5/.keras) or SavedModel fold into an ONNX model folder",
        description="Convert one fold into OUT (model.json, fold0.onnx, the original in source/), checking parity "
                    "with the original on a phantom scan. Run it with `shivacmb segment --model OUT`.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", metavar="FILE|DIR", type=Path, help=".h5 or .keras file, or SavedModel folder")
    convert.add_argument("--out", metavar="DIR", type=Path, required=True, help="model folder to write")
    convert.add_argument("--name", metavar="N", help="model name (default: the file name)")
    convert.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert.add_argument("--scan", metavar="FILE", type=Path, help="scan for the parity check (default: a phantom)")
    convert.set_defaults(handler=models_convert)

    evaluate = commands.add_parser(
        "evaluate", help="score predicted CMBs against ground truth",
        description="Detection metrics (TP, FN, FP, sensitivity, precision, F1, FP per scan, FP per true CMB, "
                    "Pearson R of counts) per scan and pooled, by the rules 'overlap' (SHIVA-CMB, SHiVAi: a CMB "
                    "is found when a predicted voxel touches it) and 'centroid5mm' (VALDO: 6-connected components "
                    "paired one to one when their centroids are at most 5 mm apart). Folders are matched by scan "
                    "id; phantom folders also give mimic detection rates per class.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--pred", metavar="P", required=True,
                          help="predictions: label map or findings.tsv, a `shivacmb segment` output folder "
                               "(P/<scan-id>/cmb_labels.* or findings.tsv), or a folder of <scan-id>.<ext> / "
                               "<scan-id>.tsv")
    evaluate.add_argument("--truth", metavar="T", required=True,
                          help="ground truth: label map (each label > 0 one CMB), a `shivacmb phantom` folder, or "
                               "a folder of <scan-id>_cmb.<ext> or <scan-id>.<ext> label maps")
    evaluate.add_argument("--rule", choices=("overlap", "centroid5mm", "both"), default="both",
                          help="matching rule (default: %(default)s)")
    evaluate.add_argument("--out", metavar="JSON", help="also write every number to this JSON file")
    evaluate.set_defaults(handler=_evaluate)
    _add_review_parser(commands)
    _add_compare_parser(commands)
    send = commands.add_parser("send", help="send DICOM results (cmb.seg.dcm, cmb.sr.dcm, comparison.sr.dcm) to a "
                                             "PACS", description=SEND_DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_argument("results", metavar="RESULT_DIR", type=Path,
                      help="a segment, batch, compare or Slicer Save results folder, or a folder above results")
    add_send_options(send, command=True)
    send.set_defaults(handler=_send)
    return parser


def _add_compare_parser(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="follow-up against baseline: new, persistent and not-seen CMBs, ARIA-H grade",
        description="Register FOLLOWUP to BASELINE (rigid, Mattes mutual information, brain-masked; any resolution, "
                    "orientation, SWI or T2*-GRE), find the CMBs of each scan (or read the given findings), match "
                    "them one to one in the baseline's space and write into DIR: comparison.tsv (one row per CMB: "
                    "status new / persistent / not seen at follow-up, positions in each scan's RAS space, volumes, "
                    "distance), comparison.json (counts, ARIA-H microhemorrhage grade from the new CMBs, "
                    "registration quality), comparison.seg.nrrd (the follow-up's CMBs, new ones named 'new CMB k' "
                    "in orange), report.html and, for a DICOM follow-up, comparison.sr.dcm (DICOM report: status of "
                    "every CMB, ARIA-H grade); without given findings, DIR/baseline/ and DIR/followup/ hold the "
                    "`segment` results. A registration below the quality threshold is refused (exit 4). "
                    "See docs/longitudinal.md.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("baseline", metavar="BASELINE", help="the earlier scan (any format `segment` reads)")
    compare.add_argument("followup", metavar="FOLLOWUP", help="the later scan")
    compare.add_argument("--out", metavar="DIR", required=True,
                         help="output folder (new, or an earlier comparison's folder, which is replaced)")
    for when in ("baseline", "followup"):
        compare.add_argument(f"--{when}-findings", metavar="F",
                             help=f"CMBs of the {when} scan: findings.tsv/.json or a `shivacmb segment` result folder "
                                  "(rejected CMBs are left out; default: detect them)")
        compare.add_argument(f"--{when}-mask", metavar="M", help=f"brain mask of the {when} scan on any grid "
                                                                 "(default: computed)")
        compare.add_argument(f"--{when}-dicom-source", metavar="DIR",
                             help=f"the DICOM series a NIfTI/NRRD {when} scan was converted from (see segment)")
    compare.add_argument("--affine", action="store_true", help="add an affine stage after the rigid registration")
    compare.add_argument("--tolerance", type=volume, default=4.0, metavar="MM",
                         help="matching distance after registration; at least twice the coarsest voxel edge "
                              "(default: %(default)s)")
    _add_scan_options(compare)
    compare.set_defaults(handler=_compare)


def _add_review_parser(commands: Any) -> None:
    review = commands.add_parser(
        "review", help="rating sessions: make one, follow progress, export ratings, agreement statistics",
        description="Rating sessions (docs/rating.md): raters review every CMB of a list of scans, blind or "
                    "assisted by the AI, in 3D Slicer or through SHIVACMBLib.rating.review. Each rater's changes are "
                    "saved one by one in SESSION/raters/<rater>/.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = review.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="make a session from a scan list or folder and optional AI results")
    new.add_argument("session", metavar="SESSION", help="folder of the new session")
    new.add_argument("--scans", metavar="LIST|DIR", required=True,
                     help="TSV/CSV list with a 'path' column (optional 'scan_id'), or a folder of scans "
                          "(searched recursively, BIDS-like folders included)")
    new.add_argument("--ai", metavar="DIR", help="AI results: DIR/<scan_id>/findings.tsv (shivacmb segment) or "
                                                 "DIR/<scan_id>.tsv; copied into the session")
    new.add_argument("--mode", choices=("assisted", "blind"), default="assisted",
                     help="assisted: raters review the AI findings; blind: raters mark CMBs without the AI, "
                          "which is shown only after each scan is submitted (default: %(default)s)")
    new.set_defaults(handler=_review_new)
    status = actions.add_parser("status", help="progress per rater")
    status.add_argument("session", metavar="SESSION")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_review_status)
    export = actions.add_parser("export", help="one row per scan per rater, and one row per finding (TSV)")
    export.add_argument("sessions", nargs="+", metavar="SESSION")
    export.add_argument("--out", metavar="DIR", required=True,
                        help="writes DIR/ratings_scans.tsv and DIR/ratings_findings.tsv")
    export.set_defaults(handler=_review_export)
    agree = actions.add_parser(
        "agree", help="agreement of raters with each other and with the AI",
        description="For every pair of readers (raters and the AI) over the scans both rated: findings matched "
                    "by centroids within 5 mm (sensitivity, precision, F1 with the first as reference), count "
                    "ICC(A,1), Pearson R, Cohen's kappa of presence and of the count categories 0, 1, 2-4, >=5, "
                    "Bland-Altman bias and limits of agreement.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    agree.add_argument("sessions", nargs="+", metavar="SESSION")
    agree.add_argument("--certainty", choices=("all", "definite"), default="all",
                       help="count definite and possible CMBs, or definite only (default: %(default)s)")
    agree.add_argument("--plots", metavar="DIR", help="write one Bland-Altman PNG per pair (needs matplotlib)")
    agree.add_argument("--out", metavar="JSON", help="also write every number to this JSON file")
    agree.set_defaults(handler=_review_agree)


def release_freed_memory() -> None:
    """Ask glibc to serve allocations over 1 MiB by mmap, so that freed volumes leave the process.

    By default glibc keeps freed heap resident; a run that allocates and frees several
    volume-sized arrays then looks (and is, to the OS) several volumes bigger than the data
    it holds. Only the command does this: the library never changes process-wide settings.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    release_freed_memory()
    previous = _install_cancel_handlers()
    try:
        return int(args.handler(args) or 0)
    except ShivaError as err:
        _error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        _error("cancelled")
        return Cancelled.exit_code
    except MemoryError:
        _error("out of memory")
        return 4
    except Exception as err:  # noqa: BLE001 - last resort: one line, and the trace on demand
        if os.environ.get("SHIVACMB_DEBUG"):
            traceback.print_exc()
        _error(f"internal error: {type(err).__name__}: {' '.join(str(err).split())[:300]} "
               "(set SHIVACMB_DEBUG=1 for the traceback)")
        return 4
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _error(message: str) -> None:
    print(f"{ERROR_PREFIX} {message}", file=sys.stderr, flush=True)


def _install_cancel_handlers() -> Dict[int, Any]:
    """SIGTERM (Slicer's Cancel, batch schedulers) ends the run like Ctrl-C: cleanly, exit 130."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, interrupt)
            except ValueError:  # not the main thread
                pass
    return previous


# --- segment ------------------------------------------------------------------------------


def _segment(args: argparse.Namespace) -> int:
    from .pipeline import SegmentOptions, segment
    from .progress import BarReporter, json_reporter

    options = settings_from_args(args, SegmentOptions, mask=args.mask, scan_id=args.scan_id,
                                 parcellation=args.parcellation, dicom_source=args.dicom_source)
    if args.progress == "json":
        report = json_reporter()
        result = segment(args.input, args.out, options, progress=report)
        print(json.dumps({"stage": "done", "fraction": 1.0, "message": _summary(result),
                          "output": str(result.output_dir), "cmb_count": len(result.findings),
                          "provider": result.run.provider, "precision": result.run.inference["precision"],
                          "warnings": result.run.warnings, "hint": _faster(args, result)}), flush=True)
        return 0
    if args.progress == "bar" and sys.stderr.isatty():
        with BarReporter(Path(args.input).name) as bar:
            result = segment(args.input, args.out, options, progress=bar)
    else:
        result = segment(args.input, args.out, options)
    print(_summary(result))
    for warning in result.run.warnings:
        print(f"warning: {warning}")
    if _faster(args, result):
        print(f"note: {_faster(args, result)}")
    return 0


def _faster(args: argparse.Namespace, result: Any) -> str:
    """The faster precisions this CPU could use for the model (run.json's inference.faster_precisions)."""
    from .modelstore.precisions import hint

    return hint(args.model or result.run.model["name"], result.run.inference.get("faster_precisions", {}))


def _summary(result: Any) -> str:
    n = len(result.findings)
    return (f"{n} CMB{'s' if n != 1 else ''} found in {result.scan_id} "
            f"({result.run.provider}, {result.run.timings_s['total']:.1f} s) -> "
            f"{result.output_dir}{os.sep} ({', '.join(result.files)})")


# --- batch --------------------------------------------------------------------------------


def _batch(args: argparse.Namespace) -> int:
    from .cohort.batch import BatchSettings, ClusterSettings, discover, run_batch

    destination = destination_from_args(args)
    cohort = discover(args.input, args.bids_filter, args.out)
    settings = settings_from_args(args, BatchSettings, threads=args.threads, retry_failed=args.retry_failed)
    cluster = ClusterSettings(scheduler=args.scheduler, workers=args.workers)
    if args.progress == "json":
        result = run_batch(cohort, args.out, settings, cluster, progress=_batch_json)
    elif args.progress == "bar" and sys.stderr.isatty():
        from .progress import BatchBar

        with BatchBar(len(cohort.jobs)) as bar:
            result = run_batch(cohort, args.out, settings, cluster, progress=bar)
    else:
        result = run_batch(cohort, args.out, settings, cluster)
    files = ", ".join(p.name for p in result.files)
    summary = (f"{result.total} scan(s): {result.done} done, {result.skipped} already done, {len(result.failed)} "
               f"failed in {result.seconds:.0f} s -> {Path(args.out)}{os.sep} ({files})")
    if destination is not None:
        summary += "; " + send_results(Path(args.out), destination, required=False).summary(destination)
    if args.progress == "json":  # front ends read JSON lines only: the summary is the last one
        print(json.dumps({"stage": "done", "fraction": 1.0, "message": summary, "output": str(Path(args.out)),
                          "total": result.total, "done": result.done, "skipped": result.skipped,
                          "failed": [{"scan_id": s, "error": e} for s, e in result.failed],
                          "files": [str(p) for p in result.files]}), flush=True)
        return 0 if result.ok else 1
    print(summary)
    for scan_id, error in result.failed:
        print(f"failed: {scan_id}: {error}")
    return 0 if result.ok else 1


def _batch_json(outcome: Dict[str, Any]) -> None:
    """One line per finished scan: stage "batch", the fraction processed, and the counts."""
    processed = outcome["total"] - outcome["remaining"]
    print(json.dumps({"stage": "batch", "fraction": round(processed / max(1, outcome["total"]), 4),
                      "message": f"{outcome['scan_id']}: {outcome['status']}", **{
                          k: outcome[k] for k in ("scan_id", "status", "total", "done", "skipped", "failed",
                                                  "remaining")}}), flush=True)


def _send(args: argparse.Namespace) -> int:
    destination = destination_from_args(args)
    report = send_results(args.results, destination)
    print(f"{args.results}{os.sep}: {report.summary(destination)}")
    return 0


# --- phantom and demo ---------------------------------------------------------------------


def _phantom(args: argparse.Namespace) -> int:
    from .files import safe_name
    from .pipeline import check_writable
    from .devtools.synthetic import generate

    check_writable(Path(args.out))
    safe_name(args.prefix, "--prefix")

    def report(done: int, total: int, scan_id: str) -> None:
        print(f"[{done}/{total}] {scan_id}", flush=True)

    index = generate(Path(args.out), args.n, args.seed, args.modality, args.spacing, args.prefix, report,
                     family=args.family)
    cmbs = sum(int(info["n_cmb"]) for info in index)
    print(f"{len(index)} phantom scan(s) with {cmbs} CMB(s) -> {Path(args.out)}{os.sep}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .devtools.demo import run_demo

    run_demo(Path(args.out), args.model, args.device)
    return 0


# --- evaluate -----------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import RULES, evaluate_folders, summary_table

    rules = RULES if args.rule == "both" else (args.rule,)
    result = evaluate_folders(args.pred, args.truth, rules)
    print(summary_table(result))
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if args.out:
        _write_json(result, args.out)
    return 0


def _write_json(result: Dict[str, Any], path: str) -> None:
    from .errors import RuntimeFailure
    from .files import atomic_write_text

    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise RuntimeFailure(f"cannot write {out}: {err.strerror or err}") from None
    print(f"metrics -> {out}")


# --- compare ------------------------------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    from .longitudinal import CompareOptions, compare
    from .pipeline import SegmentOptions
    from .progress import BarReporter, json_reporter

    detection = settings_from_args(args, SegmentOptions)
    options = CompareOptions(baseline_findings=args.baseline_findings, followup_findings=args.followup_findings,
                             baseline_mask=args.baseline_mask, followup_mask=args.followup_mask, affine=args.affine,
                             tolerance_mm=args.tolerance, detection=detection, report=args.report,
                             baseline_dicom_source=args.baseline_dicom_source,
                             followup_dicom_source=args.followup_dicom_source)
    if args.progress == "json":
        result = compare(args.baseline, args.followup, args.out, options, progress=json_reporter())
        print(json.dumps({"stage": "done", "fraction": 1.0, "message": _compare_summary(result),
                          "output": str(result.output_dir), "counts": result.summary["counts"],
                          "grade": result.summary["aria_h"]["grade"]}), flush=True)
        return 0
    if args.progress == "bar" and sys.stderr.isatty():
        with BarReporter(Path(args.followup).name) as bar:
            result = compare(args.baseline, args.followup, args.out, options, progress=bar)
    else:
        result = compare(args.baseline, args.followup, args.out, options)
    print(_compare_summary(result))
    return 0


def _compare_summary(result: Any) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in result.summary["counts"].items() if n)
    registration = result.summary["registration"]
    return (f"{counts or 'no CMB'}; ARIA-H microhemorrhage: {result.summary['aria_h']['grade']} "
            f"({registration['kind']} registration, brain-mask Dice {registration['mask_dice']:.2f}, "
            f"{registration['seconds']:.1f} s) -> {result.output_dir}{os.sep} ({', '.join(result.files)})")


# --- review -------------------------------------------------------------------------------


def _review_new(args: argparse.Namespace) -> int:
    from .rating.review import ai_results, create_session, scans_from

    scans = scans_from(args.scans)
    ai = ai_results(args.ai, [scan_id for scan_id, _ in scans]) if args.ai else {}
    session = create_session(args.session, scans, args.mode, ai)
    print(f"{session.mode} session of {len(session.scans)} scan(s), {len(ai)} with AI findings -> "
          f"{session.folder}{os.sep}")
    return 0


def _review_status(args: argparse.Namespace) -> int:
    from .rating.export import status_rows
    from .rating.review import Session

    session = Session.load(args.session)
    rows = status_rows(session)
    if args.json:
        print(json.dumps({"mode": session.mode, "scans": len(session.scans), "raters": rows}, indent=2))
        return 0
    print(f"{session.mode} session, {len(session.scans)} scan(s), {len(rows)} rater(s)")
    for row in rows:
        done = row["submitted"] + row["not_ratable"]
        print(f"{row['rater']}: {done}/{row['scans']} done ({row['not_ratable']} not ratable), "
              f"{row['definite']} definite and {row['possible']} possible CMB(s), {row['hours']:.2f} h; "
              f"next: {row['next_scan'] or '-'}")
        for problem in row["problems"]:
            print(f"warning: {row['rater']}: {problem}")
    return 0


def _review_export(args: argparse.Namespace) -> int:
    from .rating.export import export

    scans, findings, n_scans, n_findings, problems = export(args.sessions, args.out)
    print(f"{n_scans} scan rating(s) -> {scans}\n{n_findings} finding rating(s) -> {findings}")
    for problem in problems:
        print(f"warning: {problem}")
    return 0


def _review_agree(args: argparse.Namespace) -> int:
    from .rating.agreement import agree, plot_bland_altman, summary_table

    result = agree(args.sessions, args.certainty)
    print(summary_table(result))
    if args.plots:
        for path in plot_bland_altman(result, args.sessions, args.plots, args.certainty):
            print(f"figure -> {path}")
    if args.out:
        _write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
