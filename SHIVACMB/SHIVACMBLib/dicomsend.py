"""Sending DICOM results to a DICOM server: DICOMweb STOW-RS (dicomweb-client) or DIMSE C-STORE (pynetdicom).

``shivacmb send RESULT_DIR``, ``shivacmb batch --send`` and the Slicer module's Save results send the DICOM objects
that the results below a folder list (the ``.dcm`` files named by run.json, comparison.json and corrections.json),
Segmentations before the reports that reference them, and record every object sent in ``dicom_sent.json`` beside
it, with the destination: a rerun sends only what that destination has not received. A failure is one line naming
the object and the problem (RuntimeFailure, exit 4); results are never changed, only the record grows.

Credentials never go on the command line: a DICOMweb password comes from ``SHIVACMB_DICOMWEB_PASSWORD`` (with
``--user``), a bearer token from ``SHIVACMB_DICOMWEB_TOKEN``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .errors import InputError, RuntimeFailure, one_line
from .files import atomic_write_text
from .runrecord import read_if_valid

PathLike = Union[str, Path]
SENT_NAME = "dicom_sent.json"
SENT_FORMAT = "shivacmb-dicom-sent/1"
RECORDS = ("run.json", "comparison.json", "corrections.json")  # what lists a result's files
PASSWORD_ENV = "SHIVACMB_DICOMWEB_PASSWORD"
TOKEN_ENV = "SHIVACMB_DICOMWEB_TOKEN"
CALLING_AET = "SHIVACMB"
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Destination:
    """A DICOMweb service (``url``) or a DIMSE peer (``host``, ``port``, ``called_aet``), with its credentials."""

    url: str = ""
    host: str = ""
    port: int = 0
    called_aet: str = ""
    calling_aet: str = CALLING_AET
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    ca_bundle: str = ""

    @property
    def key(self) -> str:
        """How the sent record names the destination (never with credentials)."""
        return f"dicomweb {self.url}" if self.url else f"dimse {self.called_aet}@{self.host}:{self.port}"


def dimse_address(text: str) -> Tuple[str, int, str]:
    """``HOST:PORT:AET`` -> (host, port, called AE title); InputError when it is not one."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3:
        host, port, aet = parts
        if host and port.isdigit() and 0 < int(port) < 65536 and 0 < len(aet) <= 16 and "\\" not in aet:
            return host.strip("[]"), int(port), aet
    raise InputError(None, f"'{text}' is neither a DICOMweb URL (http:// or https://) nor a DIMSE peer HOST:PORT:AET "
                           "(host, DICOM port, AE title of at most 16 characters)")


def parse_destination(text: str, user: str = "", calling_aet: str = CALLING_AET, ca_bundle: str = "",
                      environ: Optional[Dict[str, str]] = None) -> Destination:
    """A destination from one text: a DICOMweb URL (``http(s)://[user@]host/...``) or ``HOST:PORT:AET``; the
    DICOMweb password and token from the environment."""
    from urllib.parse import urlsplit, urlunsplit

    environ = dict(os.environ if environ is None else environ)
    text = text.strip()
    if text.lower().startswith(("http://", "https://")):
        parts = urlsplit(text)
        if parts.password:
            raise InputError(None, f"a password in the URL would be kept in files and histories: give it in "
                                   f"${PASSWORD_ENV} (and the user name as https://NAME@{parts.hostname}/...)")
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        return Destination(url=urlunsplit(parts._replace(netloc=netloc)).rstrip("/"), user=parts.username or user,
                           password=environ.get(PASSWORD_ENV, ""), token=environ.get(TOKEN_ENV, ""),
                           ca_bundle=ca_bundle)
    host, port, aet = dimse_address(text)
    return Destination(host=host, port=port, called_aet=aet, calling_aet=calling_aet)


def add_send_options(parser: argparse.ArgumentParser, command: bool) -> None:
    """Where to send and how to authenticate: ``--dicomweb URL`` or ``--dimse HOST:PORT:AET`` for `send`
    (``command``), ``--send URL|HOST:PORT:AET`` for a command that sends after its work (`batch`)."""
    if command:
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--dicomweb", metavar="URL",
                           help="send by DICOMweb STOW-RS to this service root (e.g. https://pacs.example/dicom-web)")
        where.add_argument("--dimse", metavar="HOST:PORT:AET", help="send by DIMSE C-STORE to this peer")
    else:
        parser.add_argument("--send", metavar="URL|HOST:PORT:AET",
                            help="then send every scan's DICOM results (cmb.seg.dcm, cmb.sr.dcm) by DICOMweb STOW-RS "
                                 "to this service root, or by DIMSE C-STORE to this peer; see `shivacmb send`")
    parser.add_argument("--user", metavar="NAME", default="",
                        help=f"DICOMweb: HTTP basic authentication as NAME, password from ${PASSWORD_ENV} (a bearer "
                             f"token comes from ${TOKEN_ENV})")
    parser.add_argument("--ca-bundle", metavar="FILE", default="",
                        help="DICOMweb over https: trust the certificates in FILE (default: the system's)")
    parser.add_argument("--calling-aet", metavar="AET", default=CALLING_AET,
                        help="DIMSE: this side's AE title (default: %(default)s)")


def destination_from_args(args: argparse.Namespace) -> Optional[Destination]:
    """The destination the options name (None when none is given)."""
    dicomweb, dimse = getattr(args, "dicomweb", None), getattr(args, "dimse", None)
    if dicomweb and not dicomweb.lower().startswith(("http://", "https://")):
        raise InputError(None, f"--dicomweb '{dicomweb}': give an http:// or https:// URL")
    if dimse:
        dimse_address(dimse)  # HOST:PORT:AET, not a URL
    text = dicomweb or dimse or getattr(args, "send", None)
    return parse_destination(text, args.user, args.calling_aet, args.ca_bundle) if text else None


# --- what to send ---------------------------------------------------------------------------


def result_objects(root: Path) -> List[Path]:
    """The DICOM objects the results below ``root`` list, Segmentations first (hidden folders left out)."""
    if not root.is_dir():
        raise InputError(root, "not a folder: give a result folder of segment, batch, compare or the Slicer module")
    found = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for record in RECORDS:
            if record in files:
                found.update(Path(folder) / name for name in _listed(Path(folder) / record)
                             if name.endswith(".dcm") and (Path(folder) / name).is_file())
    return sorted(found, key=lambda path: (not _is_segmentation(path), str(path)))


def _listed(record: Path) -> List[str]:
    """The file names a result record lists."""
    if record.name == RECORDS[0]:
        run = read_if_valid(record)
        return run.files if run is not None else []
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(name) for name in data.get("files", [])] if isinstance(data, dict) else []


def _is_segmentation(path: Path) -> bool:
    return path.name.endswith(".seg.dcm")


def sent_uids(folder: Path, destination: Destination) -> set:
    """SOP Instance UIDs of the folder's objects that ``destination`` received."""
    return {item["sop_instance_uid"] for item in _record(folder)["sent"] if item.get("destination") == destination.key}


def _record(folder: Path) -> Dict[str, Any]:
    try:
        data = json.loads((folder / SENT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"format": SENT_FORMAT, "sent": []}
    return data if isinstance(data, dict) and isinstance(data.get("sent"), list) else {"format": SENT_FORMAT,
                                                                                         "sent": []}


def _note_sent(path: Path, uid: str, destination: Destination) -> None:
    record = _record(path.parent)
    record["sent"].append({"file": path.name, "sop_instance_uid": uid, "destination": destination.key,
                           "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    try:
        atomic_write_text(path.parent / SENT_NAME, json.dumps(record, indent=2) + "\n")
    except OSError as err:
        raise RuntimeFailure(f"{path}: sent to {destination.key}, but {SENT_NAME} cannot be written beside it "
                             f"({err.strerror or err}): a rerun would send it again") from None


# --- sending --------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What one send did."""

    sent: List[Path] = field(default_factory=list)
    already: List[Path] = field(default_factory=list)  # sent to this destination before

    def summary(self, destination: Destination) -> str:
        return (f"{len(self.sent)} DICOM object(s) sent to {destination.key}"
                + (f" ({len(self.already)} sent there before, not sent again)" if self.already else ""))


def send_results(root: PathLike, destination: Destination, required: bool = True) -> SendReport:
    """Send the DICOM objects of the results below ``root`` that ``destination`` has not received (``required``:
    refuse a folder without any)."""
    import pydicom

    root = Path(root)
    objects = result_objects(root)
    if not objects and required:
        raise InputError(root, "holds no DICOM results (cmb.seg.dcm, cmb.sr.dcm, comparison.sr.dcm): they are made "
                               "for scans read from a DICOM series, or with --dicom-source")
    report = SendReport()
    pending = []
    for path in objects:
        dataset = pydicom.dcmread(str(path))
        if str(dataset.SOPInstanceUID) in sent_uids(path.parent, destination):
            report.already.append(path)
        else:
            pending.append((path, dataset))
    if pending:
        with _store(destination, {str(ds.SOPClassUID) for _, ds in pending}) as store:
            for path, dataset in pending:
                store(path, dataset)
                _note_sent(path, str(dataset.SOPInstanceUID), destination)
                report.sent.append(path)
    return report


Store = Callable[[Path, Any], None]


@contextlib.contextmanager
def _store(destination: Destination, sop_classes: set) -> Iterator[Store]:
    """A function storing one object at ``destination``; RuntimeFailure naming the object when it fails."""
    if destination.url:
        yield _stow(destination)
        return
    with _association(destination, sop_classes) as store:
        yield store


def _stow(destination: Destination) -> Store:
    import requests
    from dicomweb_client.api import DICOMwebClient
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        """Every request gets a timeout (requests waits forever by default)."""

        def send(self, request: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = kwargs.get("timeout") or TIMEOUT_S
            return super().send(request, **kwargs)

    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, TimeoutAdapter())
    if destination.user:
        session.auth = (destination.user, destination.password)
    if destination.token:
        session.headers["Authorization"] = f"Bearer {destination.token}"
    if destination.ca_bundle:
        session.verify = destination.ca_bundle
    client = DICOMwebClient(url=destination.url, session=session)
    client.set_http_retry_params(retry=False)

    def store(path: Path, dataset: Any) -> None:
        try:
            with _quiet("dicomweb_client"):
                answer = client.store_instances(datasets=[dataset])
        except requests.exceptions.HTTPError as err:
            response = err.response
            status = f"HTTP {response.status_code} {response.reason}" if response is not None else one_line(err)
            raise RuntimeFailure(f"{path}: not sent: {destination.url} answered {status}") from None
        except requests.exceptions.RequestException as err:
            raise RuntimeFailure(f"{path}: not sent: cannot reach {destination.url} ({_reason(err)})") from None
        if answer.get("FailedSOPSequence"):  # present and empty when all went well (Orthanc)
            reason = getattr(answer.FailedSOPSequence[0], "FailureReason", "?")
            raise RuntimeFailure(f"{path}: not sent: {destination.url} refused it (failure reason {reason})")

    return store


def _reason(err: BaseException) -> str:
    """The last, most specific reason of a chained network error."""
    text = " ".join(str(err).split())
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "certificate verify failed", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return marker.lower()
    return text[-160:]


@contextlib.contextmanager
def _association(destination: Destination, sop_classes: set) -> Iterator[Store]:
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    peer = f"{destination.called_aet} at {destination.host}:{destination.port}"
    ae = AE(ae_title=destination.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = TIMEOUT_S
    for sop_class in sorted(sop_classes):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    with _quiet("pynetdicom"):
        association = ae.associate(destination.host, destination.port, ae_title=destination.called_aet)
    if not association.is_established:
        raise RuntimeFailure(f"cannot open a DICOM association with {peer} (refused, rejected or unreachable); "
                             "nothing was sent")

    def store(path: Path, dataset: Any) -> None:
        with _quiet("pynetdicom"):
            status = association.send_c_store(dataset)
        code = getattr(status, "Status", None)
        if code is None:
            raise RuntimeFailure(f"{path}: not sent: no answer from {peer} (association lost or timed out)")
        if code != 0 and not 0xB000 <= code <= 0xBFFF:  # success or warning
            raise RuntimeFailure(f"{path}: not sent: {peer} answered C-STORE status 0x{code:04X}")

    try:
        yield store
    finally:
        with _quiet("pynetdicom"):
            if association.is_established:
                association.release()


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Keep a library's log lines off stderr (the command's error stays one line)."""
    logger = logging.getLogger(name)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
