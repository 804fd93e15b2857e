"""Readers of the three glioma MRI layouts in use, mapped to one nested region encoding.

Layouts (``layout=``):

- ``brats2018`` — BraTS 2018–2022 (Menze et al., IEEE TMI 2015; Bakas et al., arXiv 1811.02629):
  ``<root>/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz`` and ``<case>_seg.nii.gz``; labels 0, 1
  necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour (2021–2022 keep the same values).
- ``brats2023`` — BraTS 2023+ adult glioma (GLI): ``<root>/<case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz``
  and ``<case>-seg.nii.gz``; labels 0, 1 NETC, 2 SNFH (oedema), 3 ET and, from 2024, 4 resection
  cavity. The cavity is kept out of WT / TC / ET and returned as its own mask ``resection``.
- ``msd`` — Medical Segmentation Decathlon Task01_BrainTumour (Antonelli et al., Nat. Commun. 2022):
  ``<root>/dataset.json``, 4D images ``imagesTr/<case>.nii.gz`` with channels (FLAIR, T1w, T1gd,
  T2w) as named by ``dataset.json["modality"]``, labels ``labelsTr/<case>.nii.gz`` 1 oedema,
  2 non-enhancing tumour, 3 enhancing tumour.

Every layout is read into the ordinal nested encoding of Hu et al. 2018 (arXiv 1810.09488)::

    0 background, 1 oedema, 2 core, not enhancing, 3 enhancing
    WT = y >= 1,  TC = y >= 2,  ET = y >= 3

and predictions go back to the layout's own values (:func:`from_ordinal`, :func:`write_prediction`),
so the challenges' evaluation and submission tools accept them.

A sample is a dict of NumPy arrays (no torch here): ``image`` (4, I, J, K) float32 in
:data:`MODALITIES` order, array axes in NIfTI index order (i, j, k); ``label`` (I, J, K) uint8 ordinal
(absent for unlabelled cases); ``resection`` (I, J, K) bool (BraTS 2024 only); ``affine`` (4, 4)
float64 voxel-to-world in mm; ``spacing`` (3,) float64 mm; ``case`` str; ``layout`` str; ``shape``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
import torch.utils.data

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.paths import safe_output_path
from threefold.datasets.registry import register_dataset
from threefold.datasets.splits import kfold_indices
from threefold.datasets.volumes import read_nifti, write_nifti

#: Canonical channel order of ``image``.
MODALITIES: tuple[str, str, str, str] = ("t1", "t1ce", "t2", "flair")

LAYOUTS: tuple[str, str, str] = ("brats2018", "brats2023", "msd")

# file-name suffix of each canonical modality, and separator between case name and suffix
_SUFFIX = {
    "brats2018": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "brats2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}),
}

# layout label value -> ordinal value; -1 marks the BraTS 2024 resection cavity (its own region)
_TO_ORDINAL: dict[str, dict[int, int]] = {
    "brats2018": {0: 0, 1: 2, 2: 1, 4: 3},
    "brats2023": {0: 0, 1: 2, 2: 1, 3: 3, 4: -1},
    "msd": {0: 0, 1: 1, 2: 2, 3: 3},
}
_FROM_ORDINAL: dict[str, tuple[int, int, int, int]] = {
    "brats2018": (0, 2, 1, 4),
    "brats2023": (0, 2, 1, 3),
    "msd": (0, 1, 2, 3),
}
_RESECTION_VALUE = 4  # BraTS 2024 GLI
_MSD_NAMES = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}
_AFFINE_ATOL_MM = 1e-3


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")


def to_ordinal(seg: np.ndarray, layout: str, source: str = "<array>") -> tuple[np.ndarray, np.ndarray | None]:
    """Layout label values -> (ordinal ``y`` uint8, ``resection`` bool mask or None).

    Raises :class:`DataFormatError` naming ``source`` and the unexpected values when ``seg`` holds a
    value outside the layout's label set, or non-integer values.
    """
    _check_layout(layout)
    table = _TO_ORDINAL[layout]
    values = np.unique(seg)
    if not np.all(values == np.round(values)):
        raise DataFormatError(f"{source}: segmentation holds non-integer values {values[values != np.round(values)][:5].tolist()}")
    unexpected = sorted(set(values.astype(np.int64).tolist()) - set(table))
    if unexpected:
        raise DataFormatError(
            f"{source}: label values {unexpected} are not in the {layout} label set {sorted(table)}"
        )
    lut = np.zeros(max(table) + 1, np.int16)
    for value, ordinal in table.items():
        lut[value] = ordinal
    mapped = lut[seg.astype(np.int64)]
    resection = (mapped == -1) if _RESECTION_VALUE in values and layout == "brats2023" else None
    return np.clip(mapped, 0, 3).astype(np.uint8), resection


def from_ordinal(y: np.ndarray, layout: str, resection: np.ndarray | None = None) -> np.ndarray:
    """Ordinal ``y`` (values 0..3) -> the layout's label values, uint8; ``resection`` (BraTS 2024)
    is written as 4 where ``y`` is background."""
    _check_layout(layout)
    if y.size and (y.min() < 0 or y.max() > 3):
        raise DataFormatError(f"ordinal labels must lie in 0..3, got range {int(y.min())}..{int(y.max())}")
    seg = np.asarray(_FROM_ORDINAL[layout], np.uint8)[y.astype(np.int64)]
    if resection is not None:
        if layout != "brats2023":
            raise DataFormatError(f"a resection-cavity mask is only defined for layout brats2023, not {layout}")
        seg[resection & (y == 0)] = _RESECTION_VALUE
    return seg


@dataclass(frozen=True)
class Case:
    """Files of one case: ``images`` one path per canonical modality (MSD: one 4D path), ``seg`` or None."""

    name: str
    layout: str
    images: tuple[Path, ...]
    seg: Path | None


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _case_folders(root: Path) -> list[Path]:
    """Case folders directly under ``root`` or one level down (BraTS 2018 training: ``HGG/``, ``LGG/``).

    A case folder holds ``<folder name>{_,-}*.nii.gz`` files; a folder that holds none and has no
    sub-folders is an error naming it.
    """
    if not root.is_dir():
        raise MissingFileError(f"{root}: dataset root is not a folder")
    out = []
    for folder in _subfolders(root):
        if any(f.name.startswith(folder.name) and f.name.endswith(".nii.gz") for f in folder.iterdir()):
            out.append(folder)
            continue
        nested = _subfolders(folder)
        if not nested:
            raise DataFormatError(
                f"{folder}: neither a case folder (<case>_<modality>.nii.gz or <case>-<modality>.nii.gz) "
                "nor a folder of case folders (such as HGG/, LGG/)"
            )
        out.extend(nested)
    return out


def detect_layout(root: str | Path) -> str:
    """``msd`` when ``root/dataset.json`` exists, else the BraTS layout whose FLAIR file name the first
    case folder holds. Raises :class:`MissingFileError` / :class:`DataFormatError` otherwise."""
    root = Path(root)
    if (root / "dataset.json").is_file():
        return "msd"
    folders = _case_folders(root)
    if not folders:
        raise MissingFileError(f"{root}: no dataset.json and no case folders; expected a BraTS or MSD Task01 root")
    for layout, (sep, names) in _SUFFIX.items():
        if (folders[0] / f"{folders[0].name}{sep}{names['flair']}.nii.gz").is_file():
            return layout
    raise DataFormatError(
        f"{folders[0]}: holds neither <case>_flair.nii.gz (brats2018) nor <case>-t2f.nii.gz (brats2023)"
    )


def _read_msd_json(meta_path: Path) -> dict:
    """The MSD ``dataset.json`` as a dict; a missing, non-UTF-8, malformed or non-object file raises a threefold error."""
    if not meta_path.is_file():
        raise MissingFileError(f"{meta_path}: MSD Task01 dataset.json not found")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{meta_path}: not a readable JSON file ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataFormatError(f"{meta_path}: expected a JSON object with 'training' / 'modality', got {type(meta).__name__}")
    return meta


def _msd_entry_path(root: Path, value: object, meta_path: Path, field: str) -> Path:
    """``root / value`` for a relative path listed in ``dataset.json``.

    The names come from a downloaded file, so they are confined to the task folder the way
    :func:`threefold.datasets.paths.safe_output_path` confines output names: no absolute path, drive,
    ``..`` or NUL. Unlike that function, symbolic links are followed: a link inside the task folder was
    placed by the user (e.g. ``imagesTr`` on another disk), not by the file.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise DataFormatError(f"{meta_path}: {field} must be a non-empty path string, got {value!r}")
    for flavour in (PurePosixPath(value), PureWindowsPath(value)):
        if flavour.is_absolute() or flavour.anchor or ".." in flavour.parts:
            raise DataFormatError(
                f"{meta_path}: {field} = {value!r} leaves the task folder {root}; expected a path relative to it without '..'"
            )
    return root / value


def list_cases(root: str | Path, layout: str | None = None, require_labels: bool = False) -> list[Case]:
    """All cases under ``root`` (BraTS: sorted by folder path; MSD: training entries sorted by name,
    then, unless ``require_labels``, the unlabelled ``test`` entries of ``dataset.json``). Missing
    image files raise :class:`MissingFileError` naming them; a missing segmentation is allowed
    (validation / test sets) unless ``require_labels``."""
    root = Path(root)
    layout = layout or detect_layout(root)
    _check_layout(layout)
    cases: list[Case] = []
    if layout == "msd":
        meta_path = root / "dataset.json"
        meta = _read_msd_json(meta_path)
        entries = meta.get("training")
        if not isinstance(entries, list):
            raise DataFormatError(f"{meta_path}: field 'training' must be a list of {{image, label}} entries")
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise DataFormatError(f"{meta_path}: training[{k}] must be an {{image, label}} object, got {entry!r}")
            image, seg = (_msd_entry_path(root, entry.get(key), meta_path, f"training[{k}].{key}") for key in ("image", "label"))
            for path in (image, seg):
                if not path.is_file():
                    raise MissingFileError(f"{path}: listed in {meta_path} but absent")
            cases.append(Case(image.name.removesuffix(".nii.gz"), layout, (image,), seg))
        cases.sort(key=lambda c: c.name)
        tests = [] if require_labels else meta.get("test", [])
        if not isinstance(tests, list):
            raise DataFormatError(f"{meta_path}: field 'test' must be a list of image paths")
        for k, entry in enumerate(tests):
            image = _msd_entry_path(root, entry.get("image") if isinstance(entry, dict) else entry, meta_path, f"test[{k}]")
            if not image.is_file():
                raise MissingFileError(f"{image}: listed in {meta_path} but absent")
            cases.append(Case(image.name.removesuffix(".nii.gz"), layout, (image,), None))
        return cases
    sep, names = _SUFFIX[layout]
    for folder in _case_folders(root):
        images = tuple(folder / f"{folder.name}{sep}{names[m]}.nii.gz" for m in MODALITIES)
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise MissingFileError(f"case {folder.name}: missing modality file(s) {', '.join(missing)}")
        seg = folder / f"{folder.name}{sep}seg.nii.gz"
        if not seg.is_file():
            if require_labels:
                raise MissingFileError(f"{seg}: segmentation required for training but absent")
            seg = None
        cases.append(Case(folder.name, layout, images, seg))
    if not cases:
        raise MissingFileError(f"{root}: no case folders found for layout {layout}")
    return cases


def _msd_channel_order(case: Case) -> list[int]:
    """Indices of the 4D MSD image's channels in :data:`MODALITIES` order, from ``dataset.json``."""
    meta_path = case.images[0].parent.parent / "dataset.json"
    modality = _read_msd_json(meta_path).get("modality", {})
    if not isinstance(modality, dict) or not all(str(k).isdecimal() for k in modality):
        raise DataFormatError(f"{meta_path}: field 'modality' must map channel numbers to names, got {modality!r}")
    by_name = {_MSD_NAMES.get(str(v).lower()): int(k) for k, v in modality.items()}
    if set(MODALITIES) - set(by_name):
        raise DataFormatError(
            f"{meta_path}: field 'modality' {modality} must name FLAIR, T1w, T1gd and T2w"
        )
    return [by_name[m] for m in MODALITIES]


def read_case(case: Case) -> dict:
    """Read one case into a sample dict (see the module docstring), through
    :func:`threefold.datasets.volumes.read_nifti` (which rejects truncated files and NaN / inf voxels).

    Raises :class:`DataFormatError` when modalities (or the segmentation) disagree in shape or
    affine (beyond 1e-3 mm), when an image is not 3D (MSD: 4D with 4 channels), or when the
    segmentation's label set is not the layout's.
    """
    vols = [read_nifti(p) for p in case.images]
    if case.layout == "msd":
        vol = vols[0]
        if vol["image"].shape[0] != 4:
            raise DataFormatError(
                f"{case.images[0]}: shape {tuple(vol['image'].shape[1:]) + (vol['image'].shape[0],)}; "
                "expected (I, J, K, 4) FLAIR, T1w, T1gd, T2w"
            )
        data = vol["image"].numpy()[_msd_channel_order(case)]
    else:
        for vol, path in zip(vols, case.images):
            if vol["image"].shape[0] != 1:
                raise DataFormatError(f"{path}: 4D image with {vol['image'].shape[0]} volumes; expected one 3D volume")
            _check_geometry(vol, path, vols[0], case.images[0])
        data = np.concatenate([vol["image"].numpy() for vol in vols])
    ref = vols[0]
    sample = {
        "image": np.ascontiguousarray(data, dtype=np.float32),
        "affine": ref["affine"].numpy(),
        "spacing": ref["spacing"].numpy(),
        "case": case.name,
        "layout": case.layout,
        "shape": tuple(int(s) for s in data.shape[1:]),
    }
    if case.seg is not None:
        seg = read_nifti(case.seg, dtype=torch.int64)
        _check_geometry(seg, case.seg, ref, case.images[0])
        label, resection = to_ordinal(seg["image"][0].numpy(), case.layout, str(case.seg))
        sample["label"] = label
        if resection is not None:
            sample["resection"] = resection
    return sample


def _check_geometry(vol: dict, path: Path, ref: dict, ref_path: Path) -> None:
    shape, ref_shape = tuple(vol["image"].shape[1:]), tuple(ref["image"].shape[1:])
    if shape != ref_shape:
        raise DataFormatError(f"{path}: shape {shape} differs from {ref_path.name} shape {ref_shape}")
    diff = float((vol["affine"] - ref["affine"]).abs().max())
    if diff > _AFFINE_ATOL_MM:
        raise DataFormatError(
            f"{path}: affine differs from {ref_path.name} by up to {diff:.4g} mm; "
            "expected the same voxel grid for all files of a case"
        )


def brain_bbox(image: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels non-zero in any modality (skull-stripped brain), ``image`` (C, I, J, K)."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        raise DataFormatError("image is zero everywhere; expected a skull-stripped brain with non-zero voxels")
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def normalize_in_brain(image: np.ndarray) -> np.ndarray:
    """Per-modality z-score over the brain voxels (non-zero in any modality); 0 outside the brain."""
    mask = np.any(image != 0, axis=0)
    vox = image[:, mask]
    mean, std = vox.mean(1), vox.std(1)
    out = (image - mean[:, None, None, None]) / np.maximum(std, 1e-8)[:, None, None, None]
    return np.where(mask, out, 0.0).astype(np.float32)


def preprocess(sample: dict) -> dict:
    """Crop to the brain bounding box and z-score each modality inside the brain.

    Adds ``bbox`` ((3, 2) int64 start / stop per axis) so predictions can be put back in the original
    grid with :func:`uncrop`; ``label`` / ``resection`` are cropped alike.
    """
    box = brain_bbox(sample["image"])
    out = dict(sample)
    out["image"] = normalize_in_brain(sample["image"][(slice(None), *box)])
    for key in ("label", "resection"):
        if key in sample:
            out[key] = np.ascontiguousarray(sample[key][box])
    out["bbox"] = np.asarray([[s.start, s.stop] for s in box], np.int64)
    return out


def uncrop(y: np.ndarray, bbox: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Place a cropped label map back into a zero array of the original ``shape``."""
    out = np.zeros(shape, y.dtype)
    out[tuple(slice(int(a), int(b)) for a, b in bbox)] = y
    return out


def write_prediction(
    path: str | Path,
    y: np.ndarray,
    affine: np.ndarray,
    layout: str,
    resection: np.ndarray | None = None,
) -> Path:
    """Write ordinal labels ``y`` (I, J, K) as a uint8 NIfTI in ``layout``'s label values with the
    input's ``affine`` (sform and qform code 1, scanner space), ready for the challenge tools."""
    return write_nifti(path, from_ordinal(y, layout, resection), np.asarray(affine, np.float64))


def write_case_brats2018(folder: str | Path, case: str, image: np.ndarray, y: np.ndarray, affine: np.ndarray) -> Path:
    """Write one case in the BraTS 2018 layout: ``image`` (4, I, J, K) in :data:`MODALITIES` order as
    float32 ``<case>_<modality>.nii.gz``, ordinal ``y`` as ``<case>_seg.nii.gz`` with values 0/1/2/4."""
    folder = Path(folder)
    for channel, modality in enumerate(MODALITIES):
        write_nifti(safe_output_path(folder, f"{case}_{modality}.nii.gz"), image[channel].astype(np.float32), affine)
    write_prediction(safe_output_path(folder, f"{case}_seg.nii.gz"), y, affine, "brats2018")
    return folder


@register_dataset("brats", "BraTS 2018-2022 / 2023+ GLI / MSD Task01 glioma MRI, nested WT/TC/ET labels", modality="volume")
class BraTS(torch.utils.data.Dataset):
    """Glioma cases of one layout; ``split`` ``all`` | ``train`` | ``val`` picks fold ``fold`` of a
    seeded ``n_folds``-fold split (``n_folds=5, fold=0`` is the 80/20 split). Items are preprocessed
    sample dicts (:func:`preprocess`) unless ``preprocessed=False``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        layout: str | None = None,
        fold: int = 0,
        n_folds: int = 5,
        seed: int = 0,
        preprocessed: bool = True,
    ) -> None:
        self.root = Path(root)
        self.layout = layout or detect_layout(self.root)
        cases = list_cases(self.root, self.layout, require_labels=split != "all")
        if split == "all":
            self.cases = cases
        elif split in ("train", "val"):
            if not 0 <= fold < n_folds:
                raise ConfigError(f"fold={fold}: expected 0 <= fold < n_folds={n_folds}")
            train_idx, val_idx = kfold_indices(len(cases), n_folds, seed)[fold]
            self.cases = [cases[i] for i in sorted(train_idx if split == "train" else val_idx)]
        else:
            raise ConfigError(f"split={split!r}: expected all, train or val")
        self.preprocessed = preprocessed

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        sample = read_case(self.cases[index])
        return preprocess(sample) if self.preprocessed else sample
