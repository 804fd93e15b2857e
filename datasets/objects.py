"""Object-level point-cloud datasets of Point-MAE (Pang et al., ECCV 2022, §4): ShapeNet-55,
ModelNet40 (resampled text and the 2048-point HDF5 release) and ScanObjectNN, plus the object
augmentations of the reference recipe.

One object sample (fixed point count per dataset, so batches stack to ``(B, N, 3)``)::

    coord    (N, 3) float32, unit-sphere normalised where the dataset says so (unitless)
    normal   (N, 3) float32, unit normals (ModelNet40 text with ``use_normals=True`` only)
    category ()     int64, class 0..C-1 (ShapeNet-55: index of the taxonomy id in sorted order)
    name     str,   file stem / record id

On-disk layouts (as distributed by the dataset authors and described in Point-MAE's DATASET.md):

* ShapeNet-55 (Yu et al., "Point-BERT", CVPR 2022): ``<root>/shapenet_pc/<taxonomy>-<model>.npy``
  (8192×3 float), split lists ``train.txt`` / ``test.txt`` (one ``.npy`` file name per line) in
  ``<root>`` or ``<root>/ShapeNet-55``.
* ModelNet40 resampled (Qi et al., PointNet++, NeurIPS 2017): ``<root>/<class>/<class>_NNNN.txt``,
  10,000 comma-separated ``x,y,z,nx,ny,nz`` rows, ``modelnet40_shape_names.txt`` (one class per line,
  line order = class index) and ``modelnet40_{train,test}.txt`` (stems ``<class>_NNNN``).
* ModelNet40 HDF5 (Qi et al., PointNet, CVPR 2017): ``<root>/ply_data_{train,test}<i>.h5``, each with
  ``data`` (M, 2048, 3) float32 and ``label`` (M, 1) integer; ``shape_names.txt`` optional.
* ScanObjectNN (Uy et al., ICCV 2019): ``<root>/main_split[_nobg]/{training,test}_objectdataset[_augmentedrot_scale75].h5``
  with ``data`` (M, 2048, 3), ``label`` (M,) and ``mask`` (M, 2048) (background points, -1); variants
  ``obj_bg`` (main_split, plain), ``obj_only`` (main_split_nobg, plain), ``pb_t50_rs``
  (main_split, ``_augmentedrot_scale75``, the hardest).

Differences from the reference code, on purpose: every random draw (the ShapeNet-55 point subset,
the augmentation, the ScanObjectNN shuffle) comes from a generator seeded by ``(seed, epoch, index)``
instead of the global NumPy state; the FPS subsampling of ModelNet40 is injected (``sampler``) because
this layer may not import :mod:`threefold.geometry`.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, require
from threefold.datasets.hdf5 import checked_dataset
from threefold.datasets.pointclouds import read_npy_array
from threefold.datasets.registry import register_dataset
from threefold.datasets.splits import item_generator

ObjectTransform = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
#: ``sampler(points (N, 3) float32 tensor, k) -> (k,) int64 indices``; the pipelines pass exact FPS.
PointSampler = Callable[[torch.Tensor, int], torch.Tensor]

SCANOBJECTNN_VARIANTS: dict[str, tuple[str, str]] = {
    "obj_bg": ("main_split", ""),
    "obj_only": ("main_split_nobg", ""),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75"),
}
_SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------- transforms
def normalize_unit_sphere(coord: torch.Tensor) -> torch.Tensor:
    """Centre a cloud on its centroid and scale it into the unit sphere (PointNet's ``pc_normalize``).

    ``coord (N, 3)`` float -> ``(N, 3)`` same dtype with mean 0 and max norm 1. A cloud whose points all
    coincide has no scale and raises :class:`DataFormatError`.
    """
    centred = coord - coord.mean(0, keepdim=True)
    radius = centred.norm(dim=1).max()
    if not bool(radius > 0):
        raise DataFormatError("normalize_unit_sphere: every point coincides (zero radius), cannot normalise")
    return centred / radius


class ScaleAndTranslate:
    """Point-MAE's ``PointcloudScaleAndTranslate``: per-axis scale ~ U[2/3, 3/2], then translate each
    axis by U[-0.2, 0.2] (in unit-sphere units). Normals are not carried (the recipe trains on xyz)."""

    def __init__(self, scale: tuple[float, float] = (2.0 / 3.0, 3.0 / 2.0), translate: float = 0.2) -> None:
        if not 0 < scale[0] <= scale[1] or translate < 0:
            raise ConfigError(f"ScaleAndTranslate: scale {scale} must be 0 < low <= high and translate {translate} >= 0")
        self.scale, self.translate = scale, translate

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        coord = sample["coord"]
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand(3, generator=generator, dtype=torch.float64)
        t = self.translate * (2 * torch.rand(3, generator=generator, dtype=torch.float64) - 1)
        out = {k: v for k, v in sample.items() if k != "normal"}
        out["coord"] = (coord.double() * s + t).to(coord.dtype)
        return out


def random_subset(num_points: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices of ``num_points`` drawn uniformly (the reference's
    ``np.random.permutation(N)[:count]``), int64 ``(count,)``."""
    if not 1 <= count <= num_points:
        raise ConfigError(f"random_subset: count={count} must be between 1 and the {num_points} points")
    return torch.randperm(num_points, generator=generator)[:count]


# ------------------------------------------------------------------------------------------ files
def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: byte {exc.start} is not UTF-8 text ({what} files are ASCII)") from exc


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingFileError(f"{path}: split/name list not found")
    lines = [ln.strip() for ln in _read_text(path, "list").splitlines()]
    names = [ln for ln in lines if ln]
    if not names:
        raise DataFormatError(f"{path}: the list is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise DataFormatError(f"{path}: entries {dup} appear more than once")
    return names


def _finite_xyz(arr: np.ndarray, where: str, columns: int = 3) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[1] < columns or arr.shape[0] == 0:
        raise DataFormatError(f"{where}: array of shape {arr.shape}, expected (N, {columns}) with N >= 1")
    if arr.dtype.kind not in "fiu":
        raise DataFormatError(f"{where}: dtype {arr.dtype}, expected a numeric array")
    if not np.isfinite(arr).all():
        raise DataFormatError(f"{where}: contains NaN or infinite values")
    return arr


def read_shapenet_npy(path: str | os.PathLike) -> np.ndarray:
    """One ShapeNet-55 cloud: ``(N, 3)`` float32 (8192 points in the release). No pickles are loaded."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: ShapeNet-55 point cloud not found")
    arr = read_npy_array(p, "fiu", (2,))
    if arr.shape[1] != 3:
        raise DataFormatError(f"{p}: array of shape {arr.shape}, expected (N, 3) x,y,z")
    return _finite_xyz(arr, str(p)).astype(np.float32)


def read_modelnet_txt(path: str | os.PathLike) -> np.ndarray:
    """One ModelNet40 resampled file: comma-separated ``x,y,z,nx,ny,nz`` rows -> ``(N, 6)`` float32."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: ModelNet40 point file not found")
    try:
        arr = np.loadtxt(io.StringIO(_read_text(p, "ModelNet40")), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataFormatError(f"{p}: expected comma-separated rows x,y,z,nx,ny,nz of numbers ({exc})") from exc
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise DataFormatError(f"{p}: rows of {arr.shape[1] if arr.ndim == 2 else '?'} values, expected 6 (x,y,z,nx,ny,nz)")
    return _finite_xyz(arr, str(p), 6).astype(np.float32)


def _read_h5(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    h5py = require("h5py", extra="points")
    if not path.is_file():
        raise MissingFileError(f"{path}: HDF5 file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataFormatError(f"{path}: no dataset {missing[0]!r}; it holds {sorted(f.keys())}")
            return {k: np.asarray(checked_dataset(path, k, f[k])[()]) for k in (*keys, *optional) if k in f}
    except DataFormatError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:  # h5py on a damaged file
        raise DataFormatError(f"{path}: not a readable HDF5 file ({type(exc).__name__}: {exc})") from exc


def _check_h5_clouds(path: Path, data: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if data.ndim != 3 or data.shape[2] < 3 or data.shape[0] == 0:
        raise DataFormatError(f"{path}: 'data' has shape {data.shape}, expected (M, N, 3) with M >= 1")
    if data.dtype.kind != "f" or not np.isfinite(data).all():
        raise DataFormatError(f"{path}: 'data' must be finite floats (dtype {data.dtype})")
    if label.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: 'label' dtype {label.dtype}, expected integers")
    if label.ndim == 2:
        if label.shape[1] != 1:
            raise DataFormatError(f"{path}: 'label' has shape {label.shape}, expected (M,) or (M, 1)")
        label = label[:, 0]
    if label.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: 'label' has {label.shape[0]} entries for {data.shape[0]} clouds in 'data'")
    if (label < 0).any():
        raise DataFormatError(f"{path}: 'label' holds negative classes {np.unique(label[label < 0])[:5].tolist()}")
    return data[:, :, :3].astype(np.float32), label.astype(np.int64)


# --------------------------------------------------------------------------------------- datasets
class _ObjectDataset(Dataset):
    """Shared item logic: subset, normalise, augment with a generator seeded from (seed, epoch, index)."""

    num_classes: int
    class_names: list[str]

    def __init__(self, transform: ObjectTransform | None, seed: int) -> None:
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _finish(self, sample: dict[str, Any], index: int) -> dict[str, Any]:
        if self.transform is not None:
            sample = self.transform(sample, item_generator(self.seed, self.epoch, index))
        return sample


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ConfigError(f"split={split!r}, expected one of {_SPLITS}")
    return split


@register_dataset("shapenet55", "ShapeNet-55 (Point-BERT release): shapenet_pc/*.npy + train.txt/test.txt",
                  modality="points")
class ShapeNet55(_ObjectDataset):
    """ShapeNet-55 for Point-MAE pretraining: each item draws ``num_points`` of the 8192 points
    uniformly without replacement (the reference's recipe, 1024 points), then normalises to the unit
    sphere. ``category`` is the index of the taxonomy id among the sorted ids of both lists."""

    def __init__(self, root: str | os.PathLike, split: str = "train", num_points: int = 1024,
                 transform: ObjectTransform | None = None, seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.root, self.split, self.num_points = Path(root), _check_split(split), int(num_points)
        self.pc_dir = self.root / "shapenet_pc"
        if not self.pc_dir.is_dir():
            raise MissingFileError(f"{self.pc_dir}: no shapenet_pc folder (expected <root>/shapenet_pc/*.npy)")
        list_dir = next((d for d in (self.root, self.root / "ShapeNet-55") if (d / "train.txt").is_file()), None)
        if list_dir is None:
            raise MissingFileError(f"{self.root}: no train.txt in <root> or <root>/ShapeNet-55")
        lists = {s: _read_list(list_dir / f"{s}.txt") for s in _SPLITS}
        pattern = re.compile(r"^(\d+)-([^/\\]+)\.npy$")
        for s, names in lists.items():
            bad = [n for n in names if not pattern.match(n)]
            if bad:
                raise DataFormatError(f"{list_dir / f'{s}.txt'}: entry {bad[0]!r} is not '<taxonomy id>-<model id>.npy'")
        self.class_names = sorted({pattern.match(n).group(1) for names in lists.values() for n in names})
        self.num_classes = len(self.class_names)
        self.files = lists[self.split]
        self._category = {c: i for i, c in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.files[index]
        cloud = torch.from_numpy(read_shapenet_npy(self.pc_dir / name))
        if cloud.shape[0] < self.num_points:
            raise DataFormatError(f"{self.pc_dir / name}: {cloud.shape[0]} points, fewer than num_points={self.num_points}")
        g = item_generator(self.seed, self.epoch, index)
        coord = normalize_unit_sphere(cloud[random_subset(cloud.shape[0], self.num_points, g)])
        sample = {"coord": coord, "category": torch.tensor(self._category[name.split("-", 1)[0]]),
                  "name": name[:-4]}
        return self._finish(sample, index)


@register_dataset("modelnet40", "ModelNet40 resampled text files (modelnet40_normal_resampled layout)",
                  modality="points")
class ModelNet40(_ObjectDataset):
    """ModelNet40 in the ``modelnet40_normal_resampled`` layout.

    Each item takes ``num_points`` of the file's points — the first ones (``sampler=None``, the
    reference's default) or the indices chosen by ``sampler`` (exact FPS in the pipelines, the
    reference's ``USE_NORMALS``/``uniform`` option), cached under ``cache_dir`` when given — normalises
    xyz to the unit sphere and keeps normals when ``use_normals``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", num_points: int = 1024,
                 use_normals: bool = False, sampler: PointSampler | None = None,
                 cache_dir: str | os.PathLike | None = None, transform: ObjectTransform | None = None,
                 seed: int = 0) -> None:
        super().__init__(transform, seed)
        self.root, self.split, self.num_points = Path(root), _check_split(split), int(num_points)
        self.use_normals, self.sampler = use_normals, sampler
        self.class_names = _read_list(self.root / "modelnet40_shape_names.txt")
        self.num_classes = len(self.class_names)
        index = {c: i for i, c in enumerate(self.class_names)}
        stems = _read_list(self.root / f"modelnet40_{self.split}.txt")
        self.items: list[tuple[str, int]] = []
        for stem in stems:
            cls = stem.rsplit("_", 1)[0]
            if "_" not in stem or cls not in index:
                raise DataFormatError(
                    f"{self.root / f'modelnet40_{self.split}.txt'}: entry {stem!r} is not '<class>_NNNN' "
                    "with a class of modelnet40_shape_names.txt"
                )
            self.items.append((stem, index[cls]))
        self.cache = None
        if cache_dir is not None and sampler is not None:
            from threefold.datasets.cache import FeatureCache

            self.cache = FeatureCache(cache_dir, "modelnet40-fps", {"num_points": self.num_points})

    def __len__(self) -> int:
        return len(self.items)

    @property
    def categories(self) -> np.ndarray:
        """``(len,)`` int64 class of every item, without reading the point files."""
        return np.array([c for _, c in self.items], dtype=np.int64)

    def _points(self, path: Path) -> np.ndarray:
        rows = read_modelnet_txt(path)
        if rows.shape[0] < self.num_points:
            raise DataFormatError(f"{path}: {rows.shape[0]} points, fewer than num_points={self.num_points}")
        if self.sampler is None:
            return rows[: self.num_points]
        if self.cache is not None:
            return self.cache.get_or_build([path], lambda: {"rows": self._sampled(rows)})["rows"]
        return self._sampled(rows)

    def _sampled(self, rows: np.ndarray) -> np.ndarray:
        idx = self.sampler(torch.from_numpy(rows[:, :3].copy()), self.num_points)
        return rows[idx.cpu().numpy()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem, category = self.items[index]
        rows = torch.from_numpy(np.ascontiguousarray(self._points(self.root / stem.rsplit("_", 1)[0] / f"{stem}.txt")))
        sample: dict[str, Any] = {"coord": normalize_unit_sphere(rows[:, :3]), "category": torch.tensor(category),
                                  "name": stem}
        if self.use_normals:
            sample["normal"] = rows[:, 3:6].clone()
        return self._finish(sample, index)


class _H5Clouds(_ObjectDataset):
    def __init__(self, files: Sequence[Path], num_points: int | None, normalize: bool, shuffle: bool,
                 transform: ObjectTransform | None, seed: int, with_mask: bool = False) -> None:
        super().__init__(transform, seed)
        datas, labels, masks = [], [], []
        for f in files:
            raw = _read_h5(f, ("data", "label"), ("mask",) if with_mask else ())
            data, label = _check_h5_clouds(f, raw["data"], raw["label"])
            if with_mask and "mask" in raw and raw["mask"].shape != data.shape[:2]:
                raise DataFormatError(f"{f}: 'mask' has shape {raw['mask'].shape}, expected {data.shape[:2]}")
            datas.append(data)
            labels.append(label)
            if with_mask and "mask" in raw:
                masks.append(raw["mask"])
        widths = {d.shape[1] for d in datas}
        if len(widths) != 1:
            raise DataFormatError(f"{files}: files hold clouds of different sizes {sorted(widths)}")
        self.data = np.concatenate(datas)
        self.label = np.concatenate(labels)
        self.mask = np.concatenate(masks) if masks and len(masks) == len(datas) else None
        self.num_points = int(num_points or self.data.shape[1])
        if self.num_points > self.data.shape[1]:
            raise ConfigError(f"num_points={self.num_points} exceeds the {self.data.shape[1]} points per cloud in {files[0]}")
        self.normalize, self.shuffle = normalize, shuffle

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def categories(self) -> np.ndarray:
        return self.label

    def __getitem__(self, index: int) -> dict[str, Any]:
        cloud = torch.from_numpy(self.data[index])
        if self.shuffle:
            idx = random_subset(cloud.shape[0], self.num_points, item_generator(self.seed, self.epoch, index))
        else:
            idx = torch.arange(self.num_points)
        coord = cloud[idx]
        sample: dict[str, Any] = {
            "coord": normalize_unit_sphere(coord) if self.normalize else coord.clone(),
            "category": torch.tensor(int(self.label[index])),
            "name": f"{index:06d}",
        }
        if self.mask is not None:
            sample["mask"] = torch.from_numpy(self.mask[index][idx.numpy()].astype(np.int64))
        return self._finish(sample, index)


def _h5_index(name: str) -> int:
    digits = re.findall(r"(\d+)\.h5$", name)
    return int(digits[0]) if digits else -1


@register_dataset("modelnet40-h5", "ModelNet40 2048-point HDF5 release (modelnet40_ply_hdf5_2048), SVM protocol",
                  modality="points")
class ModelNet40H5(_H5Clouds):
    """``modelnet40_ply_hdf5_2048``: every ``ply_data_<split><i>.h5`` in index order, clouds kept in
    file order (first ``num_points`` points, as the SVM protocol of Point-MAE/I2P-MAE reads them)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", num_points: int | None = 1024,
                 normalize: bool = True, transform: ObjectTransform | None = None, seed: int = 0) -> None:
        root = Path(root)
        files = sorted(root.glob(f"ply_data_{_check_split(split)}*.h5"), key=lambda p: _h5_index(p.name))
        if not files:
            raise MissingFileError(f"{root}: no ply_data_{split}<i>.h5 files")
        super().__init__(files, num_points, normalize, False, transform, seed)
        names_file = root / "shape_names.txt"
        self.class_names = _read_list(names_file) if names_file.is_file() else [str(i) for i in range(int(self.label.max()) + 1)]
        self.num_classes = len(self.class_names)
        if int(self.label.max()) >= self.num_classes:
            raise DataFormatError(f"{files}: label {int(self.label.max())} outside the {self.num_classes} classes of {names_file}")


@register_dataset("scanobjectnn", "ScanObjectNN h5 (variant=obj_bg|obj_only|pb_t50_rs)", modality="points")
class ScanObjectNN(_H5Clouds):
    """ScanObjectNN, 15 classes. Coordinates are kept as stored (the release is already centred and
    scaled; the reference does not renormalise); training items shuffle their points with the item
    generator as the reference does (``shuffle`` defaults to ``split == "train"``). ``mask`` (N,) int64
    is the per-point background/part mask of the file, returned when present."""

    def __init__(self, root: str | os.PathLike, split: str = "train", variant: str = "pb_t50_rs",
                 num_points: int | None = 2048, normalize: bool = False, shuffle: bool | None = None,
                 transform: ObjectTransform | None = None, seed: int = 0) -> None:
        if variant not in SCANOBJECTNN_VARIANTS:
            raise ConfigError(f"ScanObjectNN variant={variant!r}, expected one of {sorted(SCANOBJECTNN_VARIANTS)}")
        root = Path(root)
        if (root / "h5_files").is_dir():
            root = root / "h5_files"
        folder, suffix = SCANOBJECTNN_VARIANTS[variant]
        stem = "training" if _check_split(split) == "train" else "test"
        path = root / folder / f"{stem}_objectdataset{suffix}.h5"
        if not path.is_file():
            raise MissingFileError(f"{path}: ScanObjectNN {variant} {split} file not found")
        super().__init__([path], num_points, normalize, split == "train" if shuffle is None else shuffle,
                         transform, seed, with_mask=True)
        self.variant = variant
        self.num_classes = 15
        self.class_names = [str(i) for i in range(15)]
        if int(self.label.max()) >= 15:
            raise DataFormatError(f"{path}: label {int(self.label.max())} outside ScanObjectNN's 15 classes")


class Subset(Dataset):
    """Items ``indices`` of ``base`` with categories renumbered by ``classes`` (old class -> position)."""

    def __init__(self, base: _ObjectDataset, indices: Sequence[int], classes: Sequence[int]) -> None:
        self.base, self.indices = base, [int(i) for i in indices]
        self.remap = {int(c): i for i, c in enumerate(classes)}
        self.num_classes = len(self.remap)
        self.class_names = [base.class_names[int(c)] for c in classes]

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.base[self.indices[index]])
        sample["category"] = torch.tensor(self.remap[int(sample["category"])])
        return sample


def few_shot_episode(train: ModelNet40 | ScanObjectNN, test: ModelNet40 | ScanObjectNN, way: int, shot: int,
                     query: int = 20, seed: int = 0) -> tuple[Subset, Subset]:
    """An N-way K-shot episode (the few-shot protocol of Sharma & Kaul, NeurIPS 2020, used by
    Point-BERT and Point-MAE §4.2): ``way`` of the training split's classes drawn uniformly, ``shot`` training and ``query``
    test shapes of each drawn uniformly without replacement; classes renumbered 0..way-1 in draw order.
    A class with too few shapes raises :class:`ConfigError` naming it."""
    rng = np.random.default_rng(seed)
    present = np.unique(train.categories)
    if not 2 <= way <= len(present):
        raise ConfigError(f"few-shot way={way} must be between 2 and the {len(present)} classes of the training split")
    classes = rng.choice(present, size=way, replace=False)
    picks: dict[str, list[int]] = {"train": [], "test": []}
    for c in classes:
        for split, ds, count in (("train", train, shot), ("test", test, query)):
            pool = np.flatnonzero(ds.categories == c)
            if len(pool) < count:
                raise ConfigError(f"few-shot: class {train.class_names[c]!r} has {len(pool)} {split} shapes, "
                                  f"fewer than the {count} asked")
            picks[split].extend(rng.choice(pool, size=count, replace=False).tolist())
    return Subset(train, picks["train"], classes.tolist()), Subset(test, picks["test"], classes.tolist())


def collate_objects(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack fixed-size object samples: tensors to ``(B, ...)``, other values to lists.

    Every sample must have the same keys and the same point count (``coord`` (N, 3)); a mismatch
    raises :class:`DataFormatError` naming the offending sample.
    """
    if not samples:
        raise DataFormatError("collate_objects: got an empty list of samples")
    keys = set(samples[0])
    for b, s in enumerate(samples):
        if set(s) != keys:
            raise DataFormatError(f"collate_objects: sample {b} has fields {sorted(s)}, sample 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    for key in sorted(keys):
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise DataFormatError(f"collate_objects: field {key!r} has shapes {sorted(shapes)}; objects need one size")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
