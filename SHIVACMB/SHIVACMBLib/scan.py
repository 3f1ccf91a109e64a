"""Scans on disk: read any SimpleITK format or a DICOM series, keep the full geometry, refuse bad input.

Every refusal is an :class:`InputError` naming the file and the problem in one line.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, RuntimeFailure
from .files import checksum
from .geometry import Geometry
from .nativelog import native_stderr_captured

PathLike = Union[str, Path]

# Format name and the extension results are written with, by input extension.
_FORMATS = {
    ".nii.gz": ("nifti", ".nii.gz"),
    ".nii": ("nifti", ".nii.gz"),
    ".nrrd": ("nrrd", ".nrrd"),
    ".nhdr": ("nrrd", ".nrrd"),
    ".mha": ("metaimage", ".mha"),
    ".mhd": ("metaimage", ".mha"),
}
SCAN_SUFFIXES = tuple(_FORMATS)  # image files a folder search picks up
MIN_SIDE = 4  # voxels along each axis of a scan (smoothing and the brain mask need a neighbourhood)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
_DICOM_POSITION_TAG = "0020|0032"
_DICOM_ORIENTATION_TAG = "0020|0037"


@dataclass
class Scan:
    """A 3D scalar image with its geometry, as read from disk."""

    path: Path
    image: sitk.Image
    format: str
    sha256: str
    files: List[Path] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.image)

    @property
    def scan_id(self) -> str:
        return scan_id_from_path(self.path)

    @property
    def output_extension(self) -> str:
        """Extension for label maps written beside this scan (the input's format, DICOM -> NIfTI)."""
        return _FORMATS.get(_suffix(self.path), ("", ".nii.gz"))[1]


def scan_id_from_path(path: PathLike) -> str:
    """File name without image extensions (``sub-01_swi.nii.gz`` -> ``sub-01_swi``); folder name for DICOM."""
    path = Path(path)
    suffix = _suffix(path)
    name = path.name
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else path.stem or name


def find_scans(folder: PathLike) -> List[Path]:
    """Every image file below ``folder`` and every folder of ``.dcm`` files, in path order (hidden ones skipped)."""
    folder = Path(folder)
    found = [p for p in sorted(folder.rglob("*"))
             if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    images = [p for p in found if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES)]
    dicom = sorted({p.parent for p in found if p.is_file() and p.suffix.lower() == ".dcm"})
    paths = sorted(images + dicom)
    if not paths:
        raise InputError(folder, "no scans found (image files or DICOM folders)")
    return paths


def source_files(path: PathLike) -> List[Path]:
    """The files a scan is read from: the file and a detached header's data file, or a folder's files."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not path.is_file():
        raise InputError(path, "no such file or folder")
    return [path] + _companion_files(path)


def read_scan(path: PathLike) -> Scan:
    """Read a scan (file or DICOM series folder) and check it can be processed."""
    path = Path(path)
    image, files, fmt, warnings = _read_any(path)
    if min(image.GetSize()) < MIN_SIDE:
        raise InputError(path, f"image too small (size {'x'.join(map(str, image.GetSize()))}): a scan needs at least "
                               f"{MIN_SIDE} voxels along each axis")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(path, "complex-valued image; give the magnitude image")
    hidden = _nifti_non_finite(path) if fmt == "nifti" else 0
    warnings += _check_voxels(image, path, hidden)
    return Scan(path=path, image=image, format=fmt, sha256=checksum(files), files=files, warnings=warnings)


def read_label_image(path: PathLike) -> sitk.Image:
    """Read a mask or label map (any grid) with the same checks on format and geometry."""
    return _read_any(Path(path))[0]


# --- reading ------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _FORMATS:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _read_any(path: Path) -> Tuple[sitk.Image, List[Path], str, List[str]]:
    """Image, the files it came from, its format name, and what ITK printed while reading."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    printed: List[str] = []
    with native_stderr_captured(printed):
        if path.is_dir():
            image, files = _read_dicom_series(path)
            fmt = "dicom"
        else:
            image = _read_file(path)  # refuses a bad geometry from the header, before the pixels
            files = [path] + _companion_files(path)
            fmt = _FORMATS.get(_suffix(path), (_suffix(path).lstrip(".") or "unknown", ""))[0]
    notes = [f"reader: {line.strip()}" for line in "".join(printed).splitlines() if "WARNING" in line]
    return image, files, fmt, notes


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(path, f"cannot read image: {_itk_reason(err)}") from None
    size = list(reader.GetSize())
    _check_shape(path, size, reader.GetNumberOfComponents())
    dim = len(size)
    header_grid = Geometry(tuple(size[:3]), tuple(reader.GetSpacing()[:3]), tuple(reader.GetOrigin()[:3]),
                           tuple(np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel()))
    problems = header_grid.problems()
    if problems:  # ITK would refuse these later with a less helpful message
        raise InputError(path, problems[0])
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    if len(size) == 4:  # a 4D file holding a single volume: read that volume
        reader.SetExtractIndex([0, 0, 0, 0])
        reader.SetExtractSize(size[:3] + [0])
    try:
        return reader.Execute()
    except RuntimeError as err:
        if "allocate" in str(err).lower():  # a complete file larger than the memory left
            raise RuntimeFailure(f"{path}: not enough memory to read this image ({'x'.join(map(str, size[:3]))} "
                                 "voxels)") from None
        raise InputError(path, "cannot read pixel data: file truncated or corrupt") from None


def _check_shape(path: Path, size: Sequence[int], components: int) -> None:
    if components != 1:
        raise InputError(path, f"{components}-component (vector/RGB) image; a scalar 3D image is needed")
    if len(size) == 4 and size[3] > 1:
        raise InputError(path, f"4D image with {size[3]} volumes; give a single 3D volume")
    if len(size) > 4:
        raise InputError(path, f"{len(size)}D image; a 3D volume is needed")
    spatial = list(size[:3])
    shown = "x".join(str(s) for s in size)
    if len(spatial) < 3 or sum(s > 1 for s in spatial) == 2:
        raise InputError(path, f"2D image (size {shown}); a 3D volume is needed")
    if min(spatial) < 2:
        raise InputError(path, f"{'a single voxel' if max(spatial) == 1 else 'a line of voxels'} (size {shown}); "
                               "a 3D volume is needed")


def _check_voxels(image: sitk.Image, path: Path, hidden_non_finite: int = 0) -> List[str]:
    """Refuse empty or all-NaN images; report (but accept) partly non-finite ones.

    ``hidden_non_finite``: non-finite voxels the reader already turned into 0 (ITK does for NIfTI).
    """
    values = sitk.GetArrayViewFromImage(image)
    warnings = []
    if np.issubdtype(values.dtype, np.floating):
        n_finite = int(np.count_nonzero(np.isfinite(values))) - hidden_non_finite
        if n_finite == 0:
            raise InputError(path, "every voxel is NaN or infinite")
        if n_finite < values.size:
            warnings.append(f"{values.size - n_finite} non-finite voxels set to 0")
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))  # reductions: no copy of the volume
    else:
        lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise InputError(path, f"empty image: every voxel is {lo:g}")
    return warnings


def _check_nifti_complete(path: Path) -> None:
    """ITK silently zero-fills truncated NIfTI files; compare the header's data size to the file."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(path, f"cannot read NIfTI header: {err}") from None
    expected = _nifti_data_end(header)
    if expected is None:
        return
    if gz:
        if _gzip_trailer_size(path) == expected % (1 << 32):
            return  # fast path: the trailer holds the uncompressed size (mod 2**32)
        actual = _gzip_decompressed_size(path)
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(path, f"truncated file: holds {actual} bytes of the {expected} its header announces")


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Offset of the end of the voxel data announced by a NIfTI-1/2 header (None if unknown)."""
    layout = _nifti_layout(header)
    return None if layout is None else layout.offset + layout.voxels * layout.bitpix // 8


@dataclass(frozen=True)
class _NiftiLayout:
    endian: str
    datatype: int
    bitpix: int
    voxels: int
    offset: int


def _nifti_layout(header: bytes) -> Optional[_NiftiLayout]:
    """Byte order, datatype, bits per voxel, voxel count and data offset of a NIfTI-1/2 header (None if unknown)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return _NiftiLayout(endian, datatype, bitpix, voxels, max(offset, 348))


def _nifti_non_finite(path: Path) -> int:
    """NaN and infinite voxels of a floating-point NIfTI file, counted on the stored bytes (streamed), since
    ITK's reader turns them into 0 without a word; 0 for integer files."""
    gz = path.name.lower().endswith(".gz")
    with (gzip.open if gz else open)(path, "rb") as f:
        layout = _nifti_layout(f.read(540))
        if layout is None or layout.datatype not in _NIFTI_FLOATS:
            return 0
        dtype = np.dtype(layout.endian + _NIFTI_FLOATS[layout.datatype])
        f.seek(layout.offset)
        left, count = layout.voxels, 0
        while left:
            block = f.read(min(left, 1 << 22) * dtype.itemsize)
            values = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype=dtype)
            if not len(values):
                break
            count += int(values.size - np.count_nonzero(np.isfinite(values)))
            left -= values.size
    return count


def _gzip_trailer_size(path: Path) -> int:
    """ISIZE field of a gzip file's last member (-1 when the file is too short)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 18:
            return -1
        f.seek(-4, 2)
        return struct.unpack("<I", f.read(4))[0]


def _gzip_decompressed_size(path: Path) -> int:
    """Bytes a (possibly multi-member) gzip file decompresses to, up to the first truncation or error."""
    total = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                while chunk:
                    total += len(inflater.decompress(chunk))
                    chunk = b""
                    if inflater.eof:  # next member, if any, starts in the unused data
                        chunk = inflater.unused_data
                        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error:
        pass
    return total


def _companion_files(path: Path) -> List[Path]:
    """The data file named in a detached header (.nhdr 'data file:', .mhd 'ElementDataFile ='), for the checksum."""
    suffix = _suffix(path)
    if suffix not in (".nhdr", ".mhd"):
        return []
    separator = ":" if suffix == ".nhdr" else "="
    keys = ("datafile", "data file") if suffix == ".nhdr" else ("elementdatafile",)
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(separator)
        if sep and key.strip().lower() in keys:
            candidate = path.parent / value.strip()
            return [candidate] if candidate.is_file() else []
    return []


def _read_dicom_series(folder: Path) -> Tuple[sitk.Image, List[Path]]:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise InputError(folder, f"cannot scan folder for DICOM: {_itk_reason(err)}") from None
    if not series:
        raise InputError(folder, "folder holds no DICOM series (give an image file or a DICOM series folder)")
    if len(series) > 1:
        shown = ", ".join(series[:3]) + (", ..." if len(series) > 3 else "")
        raise InputError(folder, f"folder holds {len(series)} DICOM series ({shown}); give a folder with one series")
    files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])]
    if len(files) < 2:
        raise InputError(folder, "DICOM series has a single file: one slice, or an enhanced multi-frame file "
                                 "whose geometry ITK does not read reliably (convert it with dcm2niix)")
    _check_dicom_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(folder, f"cannot read DICOM series: {_itk_reason(err)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(folder, "DICOM series is not a scalar (grey-level) image")
    problems = Geometry.of(image).problems()
    if problems:
        raise InputError(folder, problems[0])
    return image, files


def _check_dicom_slices(folder: Path, files: Sequence[Path]) -> None:
    """Refuse series with duplicate positions (several echoes/images per slice) or missing slices."""
    positions = []
    normal = None
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
            positions.append([float(v) for v in reader.GetMetaData(_DICOM_POSITION_TAG).split("\\")])
            if normal is None:
                o = [float(v) for v in reader.GetMetaData(_DICOM_ORIENTATION_TAG).split("\\")]
                normal = np.cross(o[:3], o[3:])
        except (RuntimeError, ValueError):
            raise InputError(f, "DICOM file without a readable image position/orientation") from None
    along = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise InputError(folder, "DICOM series has several images at the same slice position "
                                 "(multiple echoes or magnitude/phase?); give one image per position")
    if gaps.max() > 1.5 * np.median(gaps):
        raise InputError(folder, f"DICOM series has uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                                 "missing slices?")


def _itk_reason(err: Exception) -> str:
    """The informative part of a SimpleITK/ITK error message, on one line."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "sitk::ERROR:" in ln:
            reason = ln.split("sitk::ERROR:", 1)[1].strip()
            break
    else:
        reason = lines[-1] if lines else "unknown error"
    if "Unable to determine ImageIO reader" in reason:
        return "not an image file in a format SimpleITK reads (NIfTI, NRRD, MHA/MHD, DICOM...)"
    return reason.replace("\n", " ")[:300]
