"""Train the demonstration model on phantoms (needs the optional ``train`` extra: torch).

The steps, each resumable:
  prepare  phantoms -> model-box arrays, through the same read/mask/resample/normalise code
           that ``segment`` runs, so the network sees exactly what it will see at inference;
  mine     a model's false positives on those arrays (hard negatives for a later fit);
  fit      patch training of the residual U-Net (32^3 patches or ``--patch``, 4 per step, centred on
           CMBs, on mimics, on mined false positives and at random in the brain), loss BCE (mimic
           voxels weighted by ``--mimic-loss-weight``, small CMBs' by ``--small-cmb-weight``) + soft Dice,
           augmentation by ``--augment``, checkpoint every
           100 steps, exact resume; ``--init`` starts from a checkpoint or from an exported ONNX fold;
  export   one ONNX fold per run (opset 17, dynamic spatial axes) plus a parity check against torch;
  screen   every ensemble of some folds, per threshold, on prepared validation phantoms (model box);
  calibrate metrics per threshold on validation phantoms, to choose the model's threshold.

    python -m SHIVACMBLib.devtools.train prepare --phantoms DIR --cache DIR
    python -m SHIVACMBLib.devtools.train mine --cache DIR --model-dir DIR --out DIR
    python -m SHIVACMBLib.devtools.train fit --cache DIR --run DIR --steps 9000 --seed 7 [--hard DIR --mix C M B H]
    python -m SHIVACMBLib.devtools.train export --run DIR [DIR ...] --model-dir DIR [--threshold T] [--metrics M.json]
    python -m SHIVACMBLib.devtools.train screen --cache VALIDATION_CACHE --folds A.onnx B.onnx [...]
    python -m SHIVACMBLib.devtools.train calibrate --model-dir DIR --phantoms VALIDATION --work DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn
from torch.nn import functional as F

from ..files import atomic_path
from ..geometry import resample
from ..modelstore.models import Normalization, extent_threshold_problem
from ..postprocess import CONNECT_26
from ..preprocess import compute_brain_mask, prepare_input
from ..scan import read_scan
from .selection import calibrate, calibration_table, compare, found_by_size, screen
from .synthetic import MIMIC_CLASSES, read_objects, truth_paths
from .unet import WIDTHS, ResidualUNet3D, widen, widths_of

BOX = (160, 214, 176)
INPUT = SimpleNamespace(shape=BOX, spacing_mm=(1.0, 1.0, 1.0), normalization=Normalization())
PATCH = 32
# patch centres: on a CMB voxel, on a mimic voxel, anywhere in the brain (and, with mined hard
# negatives, a fourth share on a model's false positives)
MIX = (0.6, 0.25, 0.15)
# With 2e-3, or with two 48^3 or 64^3 patches per step, the network settled on "no CMB anywhere"
# within a few hundred steps (under BCE + Dice, weighted BCE and focal loss alike); four 32^3
# patches per step at 5e-4 learn (CMB recall 0.76 on training patches after 200 steps).
LEARNING_RATE = 5e-4
SMALL_CMB_VOXELS = 30  # a CMB of 3.9 mm at 1 mm; smaller ones weigh more with a small-CMB loss weight
OPSET = 17
IR_VERSION = 8  # the lowest that opset 17 allows: every onnxruntime build of the last years loads it


# --- prepare ------------------------------------------------------------------------------


def prepare(phantoms: Path, cache: Path) -> List[Path]:
    """Model-box arrays for every phantom, [x, y, z]: volume float16, cmb and brain uint8 (0/1),
    mimic uint8 (0, or 1 + index of the mimic's class in ``MIMIC_CLASSES``)."""
    cache.mkdir(parents=True, exist_ok=True)
    done = []
    for image_path in sorted(Path(phantoms).glob("*.nii.gz")):
        scan_id = image_path.name[:-len(".nii.gz")]
        target = cache / f"{scan_id}.npz"
        if not target.exists():
            scan = read_scan(image_path)
            model_input = prepare_input(scan, compute_brain_mask(scan), INPUT)
            truth = truth_paths(Path(phantoms), scan_id)
            cmb, mimic = (sitk.GetArrayFromImage(resample(sitk.ReadImage(str(truth[key])), model_input.grid,
                                                          sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt16))
                          for key in ("cmb", "mimics"))
            mimics = [row for row in read_objects(truth["objects"]) if row["kind"] == "mimic"]
            # mimics outside the model box are listed but leave no voxel in it
            codes = np.zeros(max([int(mimic.max())] + [int(row["label"]) for row in mimics]) + 1, dtype=np.uint8)
            for row in mimics:
                codes[int(row["label"])] = 1 + MIMIC_CLASSES.index(row["class"])
            arrays = {"volume": model_input.volume.astype(np.float16), "cmb": (cmb > 0).astype(np.uint8),
                      "mimic": codes[mimic], "brain": model_input.mask.astype(np.uint8)}
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **{k: v.transpose(2, 1, 0) for k, v in arrays.items()})
            print(f"prepared {scan_id}", flush=True)
        done.append(target)
    return done


# --- fit ----------------------------------------------------------------------------------


class PatchSampler:
    """Random training patches: centred on CMB voxels, mimic voxels, or anywhere in the brain.

    ``by_class``: the mimic share is split evenly between the mimic classes, so that rare classes
    (a few calcifications per scan) are seen as often as veins, which have hundreds of times more
    voxels; otherwise every mimic voxel is equally likely. ``class_weights`` (by class only) tilts
    that split, e.g. ``{"calcification": 3}`` draws calcifications three times as often as each other
    class. ``hard``: a folder of mined false positives (``mine``), sampled with the fourth share of ``mix``.
    ``mimic_loss_weight``: the loss weight of mimic voxels in the patches (others weigh 1), so that a
    calcification of a few voxels that the network calls a CMB costs more than a few background voxels.
    ``small_cmb_weight``: the loss weight of the voxels of a CMB of fewer than ``SMALL_CMB_VOXELS`` voxels in the
    patch, ``SMALL_CMB_VOXELS / size`` up to this weight (others weigh 1), so that missing a 2 mm CMB of four voxels
    costs about what missing a 4 mm one does; batch Dice alone is ruled by the large ones.
    ``strong``: each patch is also degraded as scans are (``degrade``: blur, thick slices, noise, bias,
    wider contrast changes) instead of only a contrast scale and gamma. ``context``: three patches in ten
    also get bright CSF pockets near their centre (``add_csf_pockets``), never on a CMB or a mimic. ``faint``: four
    patches with a CMB in ten have their CMBs faded toward the tissue around them (``fade_cmbs``).
    ``cmb_by_lesion``: CMB patches pick a CMB (a 26-connected component, of any scan) first and a voxel
    of it second, so that a 2 mm CMB of a few voxels is drawn as often as an 8 mm one of hundreds;
    otherwise a scan with CMBs first and any of its CMB voxels second.
    """

    def __init__(self, files: Sequence[Path], rng: np.random.Generator, patch: int = PATCH,
                 mix: Optional[Sequence[float]] = None, by_class: bool = True, hard: Optional[Path] = None,
                 class_weights: Optional[Dict[str, float]] = None, mimic_loss_weight: float = 1.0,
                 cmb_by_lesion: bool = False, strong: bool = False, context: bool = False,
                 faint: bool = False, small_cmb_weight: float = 1.0) -> None:
        self.strong = strong
        self.context = context
        self.faint = faint
        if mimic_loss_weight <= 0 or any(w <= 0 for w in (class_weights or {}).values()):
            raise ValueError("mimic class weights and the mimic loss weight must be above 0")
        if small_cmb_weight < 1:
            raise ValueError("the small-CMB loss weight must be at least 1")
        self.small_cmb_weight = small_cmb_weight
        self.rng = rng
        self.patch = patch
        self.mimic_loss_weight = mimic_loss_weight
        self.volumes: List[np.ndarray] = []
        self.targets: List[np.ndarray] = []
        self.mimics: List[np.ndarray] = []
        self.sites: Dict[str, List[Tuple[int, np.ndarray]]] = {}
        for n, path in enumerate(files):
            data = np.load(path)
            self.volumes.append(data["volume"])
            self.targets.append(data["cmb"])
            if mimic_loss_weight != 1.0 or context or faint:
                self.mimics.append(data["mimic"])
            masks = {"brain": data["brain"] > 0}
            if not cmb_by_lesion:  # by lesion: one site list per CMB, added below
                masks["cmb"] = data["cmb"] > 0
            if by_class:
                for code in np.unique(data["mimic"][data["mimic"] > 0]).tolist():
                    masks[f"mimic:{MIMIC_CLASSES[code - 1]}"] = data["mimic"] == code
            else:
                masks["mimic:any"] = data["mimic"] > 0
            points = {key: np.argwhere(mask) for key, mask in masks.items()}
            if hard is not None:
                points["hard"] = np.load(Path(hard) / f"{Path(path).stem}.npy")
            for key, where in points.items():
                if len(where):
                    # a copy, so that the full list of voxels (a whole brain: tens of MB) is freed
                    self.sites.setdefault(key, []).append((n, where[:: max(1, len(where) // 4000)].copy()))
            if cmb_by_lesion:
                self.sites.setdefault("cmb", []).extend((n, where) for where in lesion_voxels(data["cmb"] > 0))
        shares = list(MIX if mix is None else mix) + [0.0]
        cmb, mimic, brain, hard_share = shares[:4]
        if hard_share and "hard" not in self.sites:
            raise ValueError("a share of hard-negative patches needs mined false positives (--hard)")
        unknown = set(class_weights or {}) - set(MIMIC_CLASSES)
        if unknown or (class_weights and not by_class):
            raise ValueError(f"mimic class weights need class sampling and classes of {MIMIC_CLASSES}: "
                             f"{sorted(unknown) or 'voxel sampling'}")
        tilt = {k: (class_weights or {}).get(k[len("mimic:"):], 1.0) for k in self.sites if k.startswith("mimic:")}
        self.kinds = sorted(self.sites)
        named = {"cmb": cmb, "brain": brain, "hard": hard_share}
        weights = np.array([named[k] if k in named else mimic * tilt[k] / sum(tilt.values()) for k in self.kinds])
        self.weights = weights / weights.sum()

    def _centre(self) -> Tuple[int, np.ndarray]:
        kind = self.kinds[self.rng.choice(len(self.kinds), p=self.weights)]
        scan, points = self.sites[kind][self.rng.integers(len(self.sites[kind]))]
        jitter = self.rng.integers(-self.patch // 3, self.patch // 3 + 1, 3) if kind != "brain" else 0
        return scan, points[self.rng.integers(len(points))] + jitter

    def batch(self, size: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Images, CMB targets and (with a mimic or small-CMB loss weight) per-voxel loss weights, each
        (size, 1, p, p, p)."""
        images, targets, weights = [], [], []
        for _ in range(size):
            scan, centre = self._centre()
            volume, target = self.volumes[scan], self.targets[scan]
            lo = np.clip(centre - self.patch // 2, 0, np.asarray(volume.shape) - self.patch)
            sl = tuple(slice(a, a + self.patch) for a in lo)
            image = volume[sl].astype(np.float32)
            label = target[sl].astype(np.float32)
            cmb = label > 0
            mimic = self.mimics[scan][sl] > 0 if self.mimics else None
            if self.faint and cmb.any() and self.rng.random() < 0.4:
                image = fade_cmbs(self.rng, image, cmb, mimic)
            if self.context and self.rng.random() < 0.3:
                image = add_csf_pockets(self.rng, image, cmb | mimic)
            arrays = [image, label]
            if self.mimic_loss_weight != 1.0 or self.small_cmb_weight != 1.0:
                weight = np.ones(image.shape, np.float32)
                if self.mimic_loss_weight != 1.0:
                    weight[mimic] = self.mimic_loss_weight
                if self.small_cmb_weight != 1.0:
                    weight = np.maximum(weight, small_cmb_weights(cmb, self.small_cmb_weight))
                arrays.append(weight)
            if self.rng.random() < 0.5:  # left-right mirror
                arrays = [a[::-1] for a in arrays]
            if self.strong:
                arrays[0] = degrade(self.rng, arrays[0])
            else:
                arrays[0] = np.clip(arrays[0] * self.rng.uniform(0.9, 1.1), 0, 1) ** self.rng.uniform(0.8, 1.25)
            for kept, array in zip((images, targets, weights), arrays):
                kept.append(np.ascontiguousarray(array))
        images_t, targets_t = (torch.from_numpy(np.stack(a)[:, None]) for a in (images, targets))
        return images_t, targets_t, torch.from_numpy(np.stack(weights)[:, None]) if weights else None


def degrade(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A normalised patch ([0, 1]) as a worse acquisition would give it, each change drawn on its own
    (nnU-Net's augmentations, on CPU): blur, a thick-slice axis (down- then up-sampled), Rician noise,
    a linear bias field, contrast scale and gamma."""
    from scipy import ndimage

    if rng.random() < 0.25:
        image = ndimage.gaussian_filter(image, rng.uniform(0.2, 0.9, 3))
    if rng.random() < 0.25:
        axis = int(rng.integers(3))
        factor = [1.0, 1.0, 1.0]
        factor[axis] = 1.0 / rng.uniform(1.5, 3.0)
        low = ndimage.zoom(image, factor, order=1)
        image = ndimage.zoom(low, [n / m for n, m in zip(image.shape, low.shape)], order=1)
    if rng.random() < 0.3:
        sigma = rng.uniform(0.01, 0.06)
        image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    if rng.random() < 0.3:
        ramp = np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape], indexing="ij", sparse=True)
        image = image * np.exp(sum(rng.uniform(-0.15, 0.15) * r for r in ramp))
    image = np.clip(image * rng.uniform(0.8, 1.2), 0, 1) ** rng.uniform(0.7, 1.4)
    return image.astype(np.float32)


def add_csf_pockets(rng: np.random.Generator, image: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """``image`` with one to three bright ellipsoids (CSF of a sulcus or a ventricle's horn: semi-axes of 1.5-4
    voxels, 1.1-1.5 times the patch's 90th percentile) 3-10 voxels from its centre, never on ``objects`` (CMBs
    and mimics) or next to them. The phantoms put cortical veins in the sulci and CMBs mostly away from CSF;
    pockets beside CMBs, mimics and tissue alike make bright CSF beside a dark dot say nothing about what the dot
    is (models/README.md, round 10, for what it did)."""
    from scipy import ndimage

    keep_out = ndimage.binary_dilation(objects, np.ones((3, 3, 3), bool), iterations=2)
    bright = min(1.0, float(np.percentile(image, 90)) * rng.uniform(1.1, 1.5))
    axes = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    centre = (np.asarray(image.shape) - 1) / 2
    out = image.copy()
    for _ in range(int(rng.integers(1, 4))):
        direction = rng.normal(size=3)
        middle = centre + direction / np.linalg.norm(direction) * rng.uniform(3.0, 10.0)
        radii = rng.uniform(1.5, 4.0, 3)
        distance = np.sqrt(sum(((a - m) / r) ** 2 for a, m, r in zip(axes, middle, radii)))
        cover = np.clip((1.0 - distance) * radii.min() + 0.5, 0.0, 1.0)  # a one-voxel soft edge
        cover[keep_out] = 0.0
        out = np.maximum(out, out + cover * (bright - out))
    return out.astype(np.float32)


def fade_cmbs(rng: np.random.Generator, image: np.ndarray, cmb: np.ndarray, mimics: np.ndarray) -> np.ndarray:
    """``image`` with each CMB of ``cmb`` (and its one-voxel rim of blooming) brought toward the median of the
    tissue 2-3 voxels around it, keeping 40-100 % of its darkness (drawn per CMB). The phantoms' CMBs are darker
    for their size than small CMBs on thick or blurred slices are; the demo head's misses were such faint ones
    (models/README.md: round 10 for why, round 12 for what it did: more CMBs found, and far more anatomy)."""
    from scipy import ndimage

    labels, _ = ndimage.label(cmb, CONNECT_26)
    out = image.copy()
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in box)
        lesion = labels[box] == index
        rim = ndimage.binary_dilation(lesion, CONNECT_26)
        shell = ndimage.binary_dilation(lesion, CONNECT_26, iterations=3) & ~rim
        shell &= ~ndimage.binary_dilation(cmb[box] | mimics[box], CONNECT_26)
        if shell.sum() < 8:
            continue
        reference = float(np.median(image[box][shell]))
        lift = (1.0 - rng.uniform(0.4, 1.0)) * np.maximum(reference - out[box], 0.0)
        out[box] = np.where(rim, out[box] + lift, out[box])
    return out.astype(np.float32)


def small_cmb_weights(cmb: np.ndarray, top: float) -> np.ndarray:
    """Per voxel: ``SMALL_CMB_VOXELS / size`` (at most ``top``, at least 1) on each 26-connected CMB of ``cmb``,
    1 elsewhere."""
    from scipy import ndimage

    labels, count = ndimage.label(cmb, CONNECT_26)
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float32)
    per_label = np.clip(SMALL_CMB_VOXELS / np.maximum(sizes, 1.0), 1.0, top)
    per_label[0] = 1.0
    return per_label[labels]


def lesion_voxels(mask: np.ndarray) -> List[np.ndarray]:
    """The voxel indices of each 26-connected component of ``mask``, one array per component."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, CONNECT_26)
    where = np.argwhere(labels)
    if not len(where):
        return []
    ids = labels[tuple(where.T)]
    order = np.argsort(ids, kind="stable")
    return np.split(where[order], np.cumsum(np.bincount(ids)[1:])[:-1])


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE (per-voxel ``weight`` when given) plus soft Dice over the whole batch (patches without
    CMBs do not make Dice undefined)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + (1 - dice)


def fit(cache: Path, run: Path, steps: int, seed: int, batch: int = 4, lr: float = LEARNING_RATE,
        checkpoint_every: int = 100, threads: Optional[int] = None, until: Optional[int] = None,
        init: Optional[Path] = None, mimics_by_class: bool = True,
        mix: Sequence[float] = MIX, hard: Optional[Path] = None,
        class_weights: Optional[Dict[str, float]] = None, patch: int = PATCH,
        mimic_loss_weight: float = 1.0, cmb_by_lesion: bool = False, augment: str = "basic",
        small_cmb_weight: float = 1.0, widths: Optional[Sequence[int]] = None) -> Path:
    """Train (or resume) for ``steps`` in all (stopping early at ``until``); return the checkpoint path.

    ``init``: start from the weights of another run's checkpoint, or of an exported ONNX fold (whose
    batch norms are folded into the convolutions: they stay frozen, see ``model_from_onnx``).
    ``widths``: channels per level (default 8-16-32-64, or the init's); wider than the init's, the
    init is widened without changing what it computes (``unet.widen``).
    """
    rng = np.random.default_rng(seed)
    files = sorted(cache.glob("*.npz"))
    sampler = PatchSampler(files, rng, patch=patch, mix=mix, by_class=mimics_by_class, hard=hard,
                           class_weights=class_weights, mimic_loss_weight=mimic_loss_weight,
                           cmb_by_lesion=cmb_by_lesion, strong=augment != "basic",
                           context=augment in ("context", "faint"), faint=augment == "faint",
                           small_cmb_weight=small_cmb_weight)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    checkpoint = run / "checkpoint.pt"
    frozen_norms = init is not None and Path(init).suffix == ".onnx"
    model = start_model(checkpoint, init, widths)
    run.mkdir(parents=True, exist_ok=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    step = resume(checkpoint, model, optimiser, rng)
    (run / "config.json").write_text(json.dumps(
        {"cache": str(cache), "scans": len(files), "steps": steps, "seed": seed, "batch": batch, "lr": lr,
         "patch": patch, "mix": list(mix), "init": str(init) if init else None, "hard": str(hard) if hard else None,
         "frozen_norms": frozen_norms, "widths": list(model.widths), "mimics_by_class": mimics_by_class,
         "class_weights": class_weights or {},
         "mimic_loss_weight": mimic_loss_weight, "small_cmb_weight": small_cmb_weight,
         "cmb_sampling": "lesion" if cmb_by_lesion else "voxel", "augment": augment, "command": " ".join(sys.argv),
         "torch": torch.__version__}, indent=2) + "\n")
    model.train()
    if frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.eval()

    def batch_loss() -> torch.Tensor:
        images, targets, weights = sampler.batch(batch)
        return loss_fn(model.logits(images), targets, weights)

    run_steps(run, model, optimiser, rng, batch_loss, step, steps, lr, until, checkpoint_every, log_every=20, seed=seed)
    return checkpoint


def run_steps(run: Path, model: nn.Module, optimiser: torch.optim.Optimizer, rng: np.random.Generator,
              batch_loss: Callable[[], torch.Tensor], step: int, steps: int, lr: float, until: Optional[int],
              checkpoint_every: int, log_every: int, **extra: object) -> None:
    """The optimisation loop from ``step`` to ``steps`` (or ``until``): cosine rate, a running loss printed and
    appended to ``run/train.log`` every ``log_every`` steps, a checkpoint every ``checkpoint_every``."""
    with open(run / "train.log", "a", encoding="utf-8") as log:
        started, running = time.time(), None
        while step < min(steps, until or steps):
            cosine_rate(optimiser, lr, step, steps)
            loss = batch_loss()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % log_every == 0:
                line = f"step {step} loss {running:.4f} lr {optimiser.param_groups[0]['lr']:.2e} " \
                       f"{(time.time() - started) / 60:.1f} min"
                print(line, flush=True)
                log.write(line + "\n")
                log.flush()
            if step % checkpoint_every == 0 or step == steps or step == until:
                save_checkpoint(run / "checkpoint.pt", model, optimiser, step, rng, **extra)


def resume(checkpoint: Path, model: nn.Module, optimiser: torch.optim.Optimizer, rng: np.random.Generator) -> int:
    """Load a run's checkpoint (weights, optimiser, both random generators) if it has one; the step to go on from."""
    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, weights_only=False)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed at step {state['step']}", flush=True)
    return int(state["step"])


def save_checkpoint(checkpoint: Path, model: nn.Module, optimiser: torch.optim.Optimizer, step: int,
                    rng: np.random.Generator, **extra: object) -> None:
    """Everything ``resume`` needs, written atomically."""
    state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
             "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), **extra}
    with atomic_path(checkpoint) as tmp:
        torch.save(state, tmp)


def start_model(checkpoint: Path, init: Optional[Path], widths: Optional[Sequence[int]]) -> ResidualUNet3D:
    """The network a fit starts from: its own checkpoint's shape when resuming, else the init's
    weights (widened to ``widths`` when given) or fresh ones."""
    if checkpoint.exists():
        return ResidualUNet3D(widths_of(torch.load(checkpoint, weights_only=False)["model"]))
    if init is None:
        return ResidualUNet3D(widths or WIDTHS)
    model = model_from_onnx(Path(init)) if Path(init).suffix == ".onnx" else load_checkpoint(Path(init)).train()
    return widen(model, widths) if widths and tuple(widths) != model.widths else model


def cosine_rate(optimiser: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """Cosine decay from ``lr`` to 1 % of it over ``steps``."""
    for group in optimiser.param_groups:
        group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def model_from_onnx(path: Path) -> ResidualUNet3D:
    """The network of an exported fold, to train further.

    The export folds every batch norm into the convolution before it, so each convolution takes
    its folded weights and each norm becomes an identity that adds the folded bias; fit keeps these
    norms in inference mode (frozen statistics), so the network starts out computing exactly what
    the ONNX fold computes.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    levels = (len(nodes) + 2) // 6  # three convolutions per block, 2 * levels - 1 blocks, and the head
    if levels < 2 or len(nodes) != 6 * levels - 2:
        raise ValueError(f"{path}: {len(nodes)} convolutions, not a network of train.py's kind")
    # the encoders' first convolutions run first, one block (three convolutions) apart
    model = ResidualUNet3D([weights[nodes[3 * level].input[1]].shape[0] for level in range(levels)]).eval()
    ran: List[nn.Conv3d] = []  # convolutions in the order the forward pass runs them, as exported
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(module))
             for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8, 8))
    for hook in hooks:
        hook.remove()
    norm_after = {}
    for block in model.modules():
        if hasattr(block, "norm1"):
            norm_after[block.conv1], norm_after[block.conv2] = block.norm1, block.norm2
    if len(nodes) != len(ran):
        raise ValueError(f"{path}: {len(nodes)} convolutions, the network has {len(ran)}")
    with torch.no_grad():
        for node, conv in zip(nodes, ran):
            weight = torch.from_numpy(weights[node.input[1]].copy())
            bias = torch.from_numpy(weights[node.input[2]].copy()) if len(node.input) > 2 else None
            if weight.shape != conv.weight.shape:
                raise ValueError(f"{path}: convolution {node.name} has shape {tuple(weight.shape)}, "
                                 f"the network expects {tuple(conv.weight.shape)}")
            conv.weight.copy_(weight)
            norm = norm_after.get(conv)
            if norm is not None:
                norm.weight.fill_(1.0)
                norm.bias.copy_(bias if bias is not None else torch.zeros_like(norm.bias))
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0 - norm.eps)
            elif conv.bias is not None:
                conv.bias.copy_(bias)
    return model


def mine(cache: Path, model_dir: Path, out: Path, threshold: float = 0.5) -> Dict[str, int]:
    """The voxels of every component a model finds outside the CMBs of each cached phantom
    (``out/<scan>.npy``, [x, y, z] rows): hard negatives for ``fit --hard``. Scans mined by an
    earlier run are kept; returns the number of false-positive components of each scan mined now."""
    from scipy import ndimage

    from ..inference import get_ensemble
    from ..modelstore.models import load_model

    ensemble = get_ensemble(load_model(str(model_dir)), "cpu")
    out.mkdir(parents=True, exist_ok=True)
    counts: Dict[str, int] = {}
    for path in sorted(Path(cache).glob("*.npz")):
        target = out / f"{path.stem}.npy"
        if not target.exists():
            data = np.load(path)
            probability, _ = ensemble.predict(data["volume"].astype(np.float32).transpose(2, 1, 0))
            components, n = ndimage.label(probability.transpose(2, 1, 0) >= threshold)
            hit = np.unique(components[data["cmb"] > 0])
            false = np.isin(components, hit[hit > 0], invert=True) & (components > 0)
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.argwhere(false).astype(np.int16))
            counts[path.stem] = n - int(np.count_nonzero(hit))
            print(f"mined {path.stem}: {counts[path.stem]} false-positive components", flush=True)
    return counts


# --- export -------------------------------------------------------------------------------


def export_onnx(model: ResidualUNet3D, path: Path) -> None:
    """ONNX with input "image" and output "probability", NCDHW, dynamic spatial axes."""
    model.eval()
    dynamic = {2: "x", 3: "y", 4: "z"}
    # the TorchScript exporter: exact for this graph and needs no onnxscript (the dynamo exporter does)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 32, 40, 24),), str(tmp), input_names=["image"],
                          output_names=["probability"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"image": dynamic, "probability": dynamic})
        lower_ir_version(tmp)


def lower_ir_version(path: Path) -> None:
    """Write the ONNX file at ``path`` with the lowest IR version its opset allows (8 for opset 17).

    torch with onnx 1.23 writes IR version 14, which onnxruntime-openvino 1.24 (the default install on x86-64)
    refuses ("max supported IR version: 13"); the graph itself needs nothing newer than its opset's IR."""
    import onnx

    proto = onnx.load(str(path))
    if proto.ir_version > IR_VERSION:
        proto.ir_version = IR_VERSION
        onnx.save(proto, str(path))


def parity(model: ResidualUNet3D, path: Path, shape: Sequence[int] = (37, 45, 29), seed: int = 0) -> float:
    """Max abs difference between torch and onnxruntime on a random input of ``shape``."""
    import onnxruntime

    model.eval()
    x = np.random.default_rng(seed).random((1, 1, *shape), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.abs(session.run(None, {"image": x})[0] - expected).max())


DESCRIPTION = ("DEMONSTRATION MODEL trained by the project on its own synthetic phantoms (procedural and "
               "atlas-based heads, SHIVACMBLib/devtools), "
               "never on real scans: not for clinical or research reads. For real scans, install the official "
               "SHIVA-CMB weights (see models/README.md).")


def write_model_folder(runs: Sequence[Path], folder: Path, metrics: Optional[Dict] = None,
                       threshold: float = 0.5, version: str = "1.0", extent_threshold: Optional[float] = None) -> Path:
    """One ONNX fold per training run (``fold0.onnx``, ``fold1.onnx``...) plus a ``model.json``
    (DESIGN: model descriptor) with their sha256 and each fold's training provenance; ``extent_threshold``
    is written when given (postprocess: hysteresis).

    A run may also be an exported ``.onnx`` fold (of a shipped model, say): it is copied as it is,
    with the provenance its own ``model.json`` records, so that an ensemble can keep a fold."""
    import shutil

    from ..files import atomic_write_text, checksum

    if any(Path(run).suffix == ".onnx" and Path(run).resolve().parent == folder.resolve() for run in runs):
        raise ValueError(f"{folder}: write the model into another folder than the ONNX folds it keeps")
    folder.mkdir(parents=True, exist_ok=True)
    folds, training, architectures = [], [], []
    for number, run in enumerate(runs):
        onnx_path = folder / f"fold{number}.onnx"
        if Path(run).suffix == ".onnx":
            provenance = onnx_provenance(Path(run))
            model = model_from_onnx(Path(run))  # for its architecture
            with atomic_path(onnx_path) as tmp:
                shutil.copyfile(run, tmp)
        else:
            model = load_checkpoint(run / "checkpoint.pt")
            export_onnx(model, onnx_path)
            provenance = {"parity_max_abs_difference": float(f"{parity(model, onnx_path):.2e}"),
                          "phases": training_phases(run)}
        folds.append({"file": onnx_path.name, "sha256": checksum([onnx_path])})
        training.append({"file": onnx_path.name, **provenance})
        architectures.append(model.architecture)
    descriptor = {
        "name": folder.name, "version": version, "target": "CMB", "modalities": ["swi", "t2s"],
        "description": DESCRIPTION, "license": "Apache-2.0", "source": "SHIVACMBLib/devtools/train.py",
        "input": {"shape": list(BOX), "layout": "NCDHW", "spacing_mm": [1, 1, 1], "orientation": "RAS",
                  "normalization": {"method": "percentile", "percentile": 99, "clip": 1.3}},
        "output": {"activation": "none", "channel": 0},
        "threshold": threshold, **({} if extent_threshold is None else {"extent_threshold": extent_threshold}),
        "fold_floor": 0.001, "folds": folds,
        "metrics": metrics or {},
        "training": {"architecture": "; ".join(dict.fromkeys(architectures)), "folds": training},
    }
    atomic_write_text(folder / "model.json", json.dumps(descriptor, indent=2) + "\n")
    return folder


def onnx_provenance(path: Path) -> Dict:
    """What the ``model.json`` beside an exported fold records of its training: its parity and
    phases (both the one-fold and the per-fold layout), the fold's sha256 first."""
    from ..files import checksum

    recorded: Dict = {}
    descriptor = path.parent / "model.json"
    if descriptor.exists():
        training = json.loads(descriptor.read_text(encoding="utf-8")).get("training", {})
        per_fold = {fold.get("file"): fold for fold in training.get("folds", [])}
        recorded = per_fold.get(path.name) or (training if "phases" in training else {})
    kept = {k: recorded[k] for k in ("parity_max_abs_difference", "phases") if k in recorded}
    return {"onnx": path.name, "sha256": checksum([path]) if path.exists() else None, **kept}


def training_phases(run: Path) -> List[Dict]:
    """The settings of ``run`` and of every run it started from (``init``), first phase first."""
    phases: List[Dict] = []
    while run is not None:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
        keep = ("scans", "steps", "seed", "batch", "lr", "patch", "widths", "mix", "mimics_by_class", "class_weights",
                "mimic_loss_weight", "small_cmb_weight", "cmb_sampling", "augment", "frozen_norms", "torch")
        phases.insert(0, {"trained_steps": step, **{k: config[k] for k in keep if k in config}})
        init = Path(config["init"]) if config.get("init") else None
        if init is not None and init.suffix == ".onnx":
            source = onnx_provenance(init)
            phases[:0] = [*source.pop("phases", []), {k: v for k, v in source.items() if k in ("onnx", "sha256")}]
            init = None
        run = init.parent if init is not None else None
    return phases


def load_checkpoint(path: Path) -> ResidualUNet3D:
    state = torch.load(path, weights_only=False)["model"]
    model = ResidualUNet3D(widths_of(state))
    model.load_state_dict(state)
    return model.eval()


def _class_weights(parser: argparse.ArgumentParser, items: Sequence[str]) -> Dict[str, float]:
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            parser.error(f"--mimic-weight {item}: expected CLASS=NUMBER")
    return weights


CANDIDATE_STEPS = ("candidates", "fit-filter", "export-filter", "screen-filter", "compare", "sizes")


def _add_candidate_steps(steps: argparse._SubParsersAction) -> None:
    """The steps on fold candidates: the candidate filter's (``filtertrain``), ``compare`` and ``sizes``
    (``selection``)."""
    c = steps.add_parser("candidates", help="cubes around the folds' candidates and the planted objects")
    c.add_argument("--cache", type=Path, required=True, help="prepared phantoms")
    c.add_argument("--folds", type=Path, nargs="+", required=True, help="segmentation folds (ONNX)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--threshold", type=float, default=0.3, help="lowest fold probability of a candidate")
    f = steps.add_parser("fit-filter", help="train the candidate filter")
    f.add_argument("--candidates", type=Path, nargs="+", required=True)
    f.add_argument("--run", type=Path, required=True)
    f.add_argument("--steps", type=int, default=3000)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--batch", type=int, default=32)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--width", type=int, default=16, help="channels of the filter's first level (then x2, x4)")
    f.add_argument("--threads", type=int)
    f.add_argument("--until", type=int, help="stop at this step (a later rerun resumes)")
    e = steps.add_parser("export-filter", help="write the filter folder (filter.onnx, filter.json)")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--threshold", type=float, required=True)
    e.add_argument("--name", default="shivacmb-candidate-filter")
    e.add_argument("--version", default="1.0")
    e.add_argument("--metrics", type=Path, help="JSON with the measured metrics to record")
    s = steps.add_parser("screen-filter", help="fold and filter thresholds on validation candidates")
    s.add_argument("--candidates", type=Path, required=True, help="candidates of validation phantoms")
    s.add_argument("--run", type=Path, help="the filter's training run (without: no filter)")
    s.add_argument("--fold-thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    s.add_argument("--filter-thresholds", type=float, nargs="+", default=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    s.add_argument("--out", type=Path, help="also write the rows as JSON")
    v = steps.add_parser("compare", help="two folds' validation candidates, scan by scan (paired bootstrap of F1)")
    v.add_argument("--candidates", type=Path, nargs=2, required=True, metavar=("FIRST", "SECOND"),
                   help="candidates of the same validation phantoms, one folder per fold")
    v.add_argument("--thresholds", type=float, nargs=2, required=True, metavar=("FIRST", "SECOND"))
    v.add_argument("--resamples", type=int, default=2000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", type=Path, help="also write the comparison as JSON")
    z = steps.add_parser("sizes", help="the CMBs a fold's candidates find, by size (<= 3, 3-5, > 5 mm)")
    z.add_argument("--candidates", type=Path, required=True, help="one fold's candidates (train candidates)")
    z.add_argument("--cache", type=Path, required=True, help="the prepared phantoms they were cut from")
    z.add_argument("--threshold", type=float, required=True)


def run_candidate_step(args: argparse.Namespace) -> int:
    from . import filtertrain

    if args.step == "candidates":
        written = filtertrain.candidates(args.cache, args.folds, args.out, args.threshold)
        print(f"{written} candidates written")
    elif args.step == "fit-filter":
        filtertrain.fit_filter(args.candidates, args.run, args.steps, args.seed, args.batch, args.lr,
                               threads=args.threads, until=args.until, width=args.width)
    elif args.step == "compare":
        try:
            result = compare(args.candidates[0], args.candidates[1], tuple(args.thresholds), args.resamples, args.seed)
        except ValueError as error:
            raise SystemExit(f"train compare: {error}") from None
        for fold in result["folds"]:
            print(f"{fold['candidates']} at {fold['threshold']:g}: TP {fold['tp']} FN {fold['fn']} FP {fold['fp']} "
                  f"F1 {fold['f1']:.4f}")
        low, high = result["interval"]
        print(f"second minus first: F1 {result['difference']:+.4f}, 95 % interval {low:+.4f} to {high:+.4f} "
              f"({result['scans']} scans, {result['resamples']} paired resamples; second ahead in "
              f"{100 * result['second_ahead']:.0f} %)")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    elif args.step == "sizes":
        try:
            counts = found_by_size(args.candidates, args.cache, args.threshold)
        except ValueError as error:
            raise SystemExit(f"train sizes: {error}") from None
        print(f"{args.candidates} at {args.threshold:g}: " + ", ".join(
            f"CMBs {name} {found}/{planted}" + (f" = {found / planted:.3f}" if planted else "")
            for name, (found, planted) in counts.items()))
    elif args.step == "export-filter":
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")) if args.metrics else None
        print(f"wrote {filtertrain.export_filter(args.run, args.out, args.threshold, args.name, args.version, metrics)}")
    else:
        rows = filtertrain.screen_filter(args.candidates, args.run, args.fold_thresholds, args.filter_thresholds)
        print(f"{'fold':>6} {'filter':>6} {'TP':>4} {'FN':>4} {'FP':>4} {'sens':>6} {'prec':>6} {'FP/scan':>7}  FP on")
        for row in rows:
            print(f"{row['fold_threshold']:>6g} {row['filter_threshold']:>6g} {row['tp']:>4} {row['fn']:>4} "
                  f"{row['fp']:>4} {row['sensitivity'] or 0:>6.3f} {row['precision'] or 0:>6.3f} "
                  f"{row['fp_avg']:>7.3f}  {row['false_positives_on']}")
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SHIVACMBLib.devtools.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prepare")
    p.add_argument("--phantoms", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    f = steps.add_parser("fit")
    f.add_argument("--cache", type=Path, required=True)
    f.add_argument("--run", type=Path, required=True)
    f.add_argument("--steps", type=int, default=9000)
    f.add_argument("--seed", type=int, default=7)
    f.add_argument("--batch", type=int, default=4)
    f.add_argument("--lr", type=float, default=LEARNING_RATE)
    f.add_argument("--patch", type=int, default=PATCH,
                   help=f"edge of the cubic training patches in voxels, a multiple of 8 from 16 to 128 "
                        f"(default {PATCH}; larger patches show the network more of the context it sees in a scan)")
    f.add_argument("--threads", type=int)
    f.add_argument("--until", type=int, help="stop at this step (a later rerun resumes)")
    f.add_argument("--init", type=Path, help="start from the weights of this checkpoint or ONNX fold (fine-tuning)")
    f.add_argument("--widths", type=int, nargs="+", metavar="C",
                   help="channels per level (default 8 16 32 64, or the init's); with --init, at least the init's "
                        "per level: the init is widened and starts out computing what it computed")
    f.add_argument("--mix", type=float, nargs="+", default=MIX, metavar="SHARE",
                   help="shares of patches centred on CMBs, mimics, anywhere in the brain "
                        "and (optional fourth) on mined false positives")
    f.add_argument("--hard", type=Path, help="folder of mined false positives (the mine step)")
    f.add_argument("--mimic-sampling", choices=("class", "voxel"), default="class",
                   help="mimic patches: each class equally often, or each mimic voxel equally often")
    f.add_argument("--cmb-sampling", choices=("voxel", "lesion"), default="voxel",
                   help="CMB patches: each CMB voxel of a scan equally often (large CMBs dominate), or each "
                        "CMB (lesion) equally often, then a voxel of it")
    f.add_argument("--augment", choices=("basic", "strong", "context", "faint"), default="basic",
                   help="basic: mirror, contrast scale and gamma; strong: also blur, thick slices, noise and bias; "
                        "context: strong, and bright CSF pockets beside CMBs, mimics and tissue alike; faint: "
                        "context, and CMBs faded toward the tissue around them")
    f.add_argument("--mimic-weight", action="append", default=[], metavar="CLASS=W",
                   help="with class sampling, draw this mimic class W times as often as the others (repeatable)")
    f.add_argument("--mimic-loss-weight", type=float, default=1.0, metavar="W",
                   help="loss weight of mimic voxels (others weigh 1): W > 1 makes calling a mimic a CMB costlier")
    f.add_argument("--small-cmb-weight", type=float, default=1.0, metavar="W",
                   help=f"loss weight of the voxels of CMBs under {SMALL_CMB_VOXELS} voxels: "
                        f"{SMALL_CMB_VOXELS} / size, at most W (others weigh 1), so that small CMBs count about as "
                        "much as large ones")
    m = steps.add_parser("mine", help="a model's false positives on the cached phantoms (hard negatives)")
    m.add_argument("--cache", type=Path, required=True)
    m.add_argument("--model-dir", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--threshold", type=float, default=0.5)
    e = steps.add_parser("export")
    e.add_argument("--run", type=Path, nargs="+", required=True,
                   help="one training run per fold, or an exported .onnx fold to keep as it is")
    e.add_argument("--model-dir", type=Path, required=True, help="model folder to write (foldN.onnx, model.json)")
    e.add_argument("--metrics", type=Path, help="JSON with the measured metrics to record in model.json")
    e.add_argument("--threshold", type=float, default=0.5, help="the model's probability threshold")
    e.add_argument("--version", default="1.0", help="the model's version (raise it whenever the folds change)")
    e.add_argument("--extent-threshold", type=float, help="a CMB's voxels reach down to this probability when its "
                   "peak exceeds --threshold (default: the threshold itself)")
    c = steps.add_parser("calibrate", help="metrics per threshold on validation phantoms (to choose --threshold)")
    c.add_argument("--model-dir", type=Path, required=True)
    c.add_argument("--phantoms", type=Path, required=True, help="validation phantoms (never used in training)")
    c.add_argument("--work", type=Path, required=True, help="folder for the segmentations")
    c.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97])
    sc = steps.add_parser("screen", help="every ensemble of some folds, per threshold, on prepared validation phantoms")
    sc.add_argument("--cache", type=Path, required=True, help="validation phantoms after prepare")
    sc.add_argument("--folds", type=Path, nargs="+", required=True, help="the project's own ONNX folds")
    sc.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    sc.add_argument("--out", type=Path, help="also write the rows as JSON")
    _add_candidate_steps(steps)
    args = parser.parse_args(argv)
    if args.step in CANDIDATE_STEPS:
        return run_candidate_step(args)
    if args.step == "fit" and len(args.mix) not in (3, 4):
        parser.error("--mix takes three or four shares")
    problem = (extent_threshold_problem(args.extent_threshold, args.threshold)
               if args.step == "export" and args.extent_threshold is not None else None)
    if problem:
        parser.error(f"--extent-threshold {args.extent_threshold}: {problem}")
    if args.step == "fit":
        if args.widths is not None and (len(args.widths) < 2 or min(args.widths) < 1):
            parser.error(f"--widths {' '.join(map(str, args.widths))}: two or more levels of at least one channel")
        pooled = 2 ** (len(args.widths or WIDTHS) - 1)  # the patch must pool down to every level
        if args.patch % pooled or not 2 * pooled <= args.patch <= 128:
            parser.error(f"--patch {args.patch}: a multiple of {pooled} from {2 * pooled} to 128")
    if args.step == "prepare":
        prepare(args.phantoms, args.cache)
    elif args.step == "fit":
        try:
            fit(args.cache, args.run, args.steps, args.seed, args.batch, args.lr, threads=args.threads,
                until=args.until, init=args.init, mimics_by_class=args.mimic_sampling == "class",
                mix=tuple(args.mix), hard=args.hard, class_weights=_class_weights(parser, args.mimic_weight),
                patch=args.patch, mimic_loss_weight=args.mimic_loss_weight,
                cmb_by_lesion=args.cmb_sampling == "lesion", augment=args.augment,
                small_cmb_weight=args.small_cmb_weight, widths=args.widths)
        except ValueError as error:  # the sampler's refusals (unknown class, missing --hard, ...)
            parser.error(str(error))
    elif args.step == "mine":
        counts = mine(args.cache, args.model_dir, args.out, args.threshold)
        print(f"{sum(counts.values())} false-positive components in {len(counts)} scans")
    elif args.step == "screen":
        rows = screen(args.cache, args.folds, args.thresholds)
        for folds in dict.fromkeys(tuple(row["folds"]) for row in rows):
            print(f"\nfolds: {' + '.join(folds)}")
            print(calibration_table([row for row in rows if tuple(row["folds"]) == folds]))
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    elif args.step == "calibrate":
        print(calibration_table(calibrate(args.model_dir, args.phantoms, args.work, args.thresholds)))
    else:
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")) if args.metrics else None
        folder = write_model_folder(args.run, args.model_dir, metrics, args.threshold, args.version,
                                    args.extent_threshold)
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
