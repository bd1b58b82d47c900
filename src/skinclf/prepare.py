"""`skinclf prepare SOURCE OUT`: the paper's 128x128 MEL/NV folder layout from a raw public download.

SOURCE is an unpacked ISIC 2019 training set (``ISIC_2019_Training_GroundTruth.csv``, one-hot
columns MEL, NV, ...; lesion ids from ``ISIC_2019_Training_Metadata.csv`` when present) or
HAM10000 (``HAM10000_metadata.csv`` with ``image_id``, ``dx``, ``lesion_id``); the format is
detected from the metadata file, and images may sit anywhere under SOURCE. MEL and NV are kept,
split into train/val/test stratified by class and grouped by lesion (all images of one lesion
land in one split: no leakage between splits), resized to 128x128 and written as
OUT/{train,val,test}/{MEL,NV}/<source image id>.<ext>, with OUT/manifest.csv. OUT is filled only
once complete: the images are written into a temporary sibling folder that is renamed to OUT at
the end (or, when OUT exists as an empty folder, emptied into it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinclf.arguments import HAM10000_CSV, ISIC_2019_CSV, prepare_parser
from skinclf.data.images import IMAGE_SIZE, decode_image
from skinclf.data.splits import SPLIT_NAMES, undersample_majority
from skinclf.errors import SkinclfError, counted, not_a_folder
from skinclf.io import files_under, missing_folders, readable, remove_empty_folders
from skinclf.sweep.resources import available_cores
from skinclf.train_arguments import override_value
from skinclf.training.progress import progress

log = logging.getLogger(__name__)

ISIC_2019_METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_WORKERS = min(8, available_cores())  # the cores this process may use (taskset, Slurm)


def parse_fractions(text: str) -> np.ndarray:
    """'71,14,15' -> fractions of train, val, test: three finite percentages summing to 100, train
    and val above 0 (test may be 0). A sum off 100 is refused, not rescaled: 70,20,20 is a typo."""
    try:
        values = np.array([float(v) for v in text.split(",")])
    except ValueError:
        values = np.array([])
    if not (
        len(values) == 3
        and np.isfinite(values).all()
        and (values >= 0).all()
        and values[0] > 0
        and values[1] > 0
        and abs(values.sum() - 100) < 1e-6
    ):
        raise SkinclfError(
            f"--split {text}: expected three percentages train,val,test summing to 100, train and val "
            "above 0, such as 71,14,15"
        )
    return values / 100


def _find_one(source: Path, name: str) -> Path | None:
    found = [path for path in files_under(source) if path.name == name]
    if len(found) > 1:
        raise SkinclfError(
            f"{source}: {len(found)} files named {name} ({found[0]}, {found[1]}); expected one"
        )
    return found[0] if found else None


def _require_columns(table: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        found = ", ".join(map(str, table.columns[:8])) + (", ..." if len(table.columns) > 8 else "")
        separators = {"\t": "tab", ";": "semicolon"}  # Excel saves CSV with semicolons in some locales
        seen = [name for sep, name in separators.items() if any(sep in str(c) for c in table.columns)]
        hint = f" ({seen[0]}-separated? expected commas)" if seen else ""
        raise SkinclfError(
            f"{path}: no column {missing[0]!r}; expected columns {', '.join(columns)}, found {found}{hint}"
        )


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise SkinclfError(f"{path}: not a readable CSV file ({err})") from err
    # Values are trimmed where they are read; a header edited by hand may carry spaces too.
    return table.rename(columns=lambda name: str(name).strip())


def _one_hot(table: pd.DataFrame, path: Path, column: str) -> pd.Series:
    """A 0/1 column of the ISIC ground truth as numbers; anything else names its row."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() | ~values.isin([0.0, 1.0])
    if bad.any():
        row = int(bad.to_numpy().argmax())
        value = table[column].iloc[row]
        raise SkinclfError(
            f"{path}: row {row + 2} ({table['image'].iloc[row]}), column {column}: "
            f"{'empty' if pd.isna(value) else repr(value)}; expected 0 or 1"
        )
    return values


# The ISIC 2019 ground truth's diagnoses besides MEL and NV.
ISIC_2019_OTHER_CLASSES = ["BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _other_class(table: pd.DataFrame, nv: pd.Series) -> np.ndarray:
    """Per row of the ISIC ground truth: NV, the first other diagnosis set to 1 (BCC, ...), or ""
    for none."""
    columns = [c for c in ISIC_2019_OTHER_CLASSES if c in table.columns]
    others = table[columns].apply(pd.to_numeric, errors="coerce").eq(1)
    first = others.idxmax(axis=1) if columns else ""
    return np.where(nv, "NV", np.where(others.any(axis=1), first, ""))


def _mel_nv_without_duplicates(records: pd.DataFrame, metadata: Path) -> pd.DataFrame:
    """The MEL and NV rows of ``records``, repeated rows of one image dropped; an image listed as
    MEL or NV and again with another label (another class included) or lesion is refused. A row
    without a diagnosis (label "") says nothing and is passed over."""
    records = records[records["label"] != ""].drop_duplicates()
    kept = records["label"].isin(["MEL", "NV"])
    repeated = records["image_id"].duplicated(keep=False) & records["image_id"].isin(
        records.loc[kept, "image_id"]
    )
    if repeated.any():
        image_id = records.loc[repeated, "image_id"].iloc[0]
        rows = records[records["image_id"] == image_id]
        listed = "; ".join(f"{r.label} lesion {r.lesion_id or '(none)'}" for r in rows.itertuples())
        raise SkinclfError(
            f"{metadata}: {image_id} is listed {len(rows)} times, as {listed}; "
            "expected one label and lesion per image"
        )
    return records[kept]


def read_records(source: Path) -> tuple[str, Path, pd.DataFrame]:
    """(dataset name, metadata file, table of image_id, label, lesion_id or '') of SOURCE: every
    listed image, its label MEL, NV, the other class it is listed as (to find conflicts) or ""."""
    isic, ham = _find_one(source, ISIC_2019_CSV), _find_one(source, HAM10000_CSV)
    if isic and ham:
        raise SkinclfError(
            f"{source}: holds both {isic.name} and {ham.name}; expected one dataset per SOURCE"
        )
    if ham:
        table = _read_csv(ham)
        _require_columns(table, ham, ["image_id", "dx", "lesion_id"])
        dx = table["dx"].fillna("").str.strip()
        label = dx.str.lower().map({"mel": "MEL", "nv": "NV"}).fillna(dx)
        records = pd.DataFrame({"image_id": table["image_id"].str.strip(), "label": label})
        records["lesion_id"] = table["lesion_id"].fillna("").str.strip()
        return "HAM10000", ham, records
    if isic:
        table = _read_csv(isic)
        _require_columns(table, isic, ["image", "MEL", "NV"])
        mel, nv = _one_hot(table, isic, "MEL") == 1, _one_hot(table, isic, "NV") == 1
        if (both := mel & nv).any():  # one-hot ground truth: a damaged file, not a melanoma
            row = int(both.to_numpy().argmax())
            raise SkinclfError(
                f"{isic}: row {row + 2} ({table['image'].iloc[row]}) has both MEL and NV set to 1; "
                "expected one diagnosis per image"
            )
        records = pd.DataFrame(
            {"image_id": table["image"].str.strip(), "label": np.where(mel, "MEL", _other_class(table, nv))}
        )
        metadata = _find_one(source, ISIC_2019_METADATA)
        lesions: dict[str, str] = {}
        if metadata:
            meta = _read_csv(metadata)
            _require_columns(meta, metadata, ["image", "lesion_id"])
            lesions = dict(
                zip(meta["image"].str.strip(), meta["lesion_id"].fillna("").str.strip(), strict=True)
            )
            mel_nv = records["image_id"][records["label"].isin(["MEL", "NV"])]
            unlisted = [i for i in mel_nv if i not in lesions]
            if unlisted:
                log.warning(
                    f"{metadata}: {counted(len(unlisted), 'MEL/NV image')} of {isic.name} not listed (first: "
                    f"{unlisted[0]}): their lesions unknown, each is split on its own"
                )
        else:
            log.warning(
                f"no {ISIC_2019_METADATA} under {source}: lesion ids unknown, images are split one by one"
            )
        records["lesion_id"] = [lesions.get(image_id, "") for image_id in records["image_id"]]
        return "ISIC 2019", isic, records
    # Another format of a metadata file (Dataverse offers HAM10000_metadata as .tab): named.
    stems = {Path(name).stem for name in (ISIC_2019_CSV, HAM10000_CSV)}
    other = next((path for path in files_under(source) if path.stem in stems), None)
    seen = f"; {other} is there: expected it as CSV, named {other.stem}.csv" if other else ""
    raise SkinclfError(
        f"{source}: neither {ISIC_2019_CSV} (ISIC 2019 training set) nor {HAM10000_CSV} (HAM10000) "
        f"found in it{seen}; expected the unpacked download of one of them"
    )


def locate_images(
    source: Path, image_ids: pd.Series, metadata: Path, skip_bad_images: bool = False
) -> list[Path]:
    """The image file of each id, searched anywhere under SOURCE, symlinked folders included
    (first in path order when repeated). A missing one is an error even with ``skip_bad_images``:
    a download unpacked in part (HAM10000 comes in two parts) would otherwise lose a share of its
    images to the skipped list."""
    index: dict[str, Path] = {}
    others: dict[str, Path] = {}  # files of other kinds, to name one that stands for a listed image
    for path in files_under(source):
        found = index if path.suffix.lower() in IMAGE_SUFFIXES else others
        found.setdefault(path.stem, path)
    missing = [i for i in image_ids if i not in index]
    if missing:
        other = others.get(missing[0])
        seen = f", though {other} is there: only .jpg/.jpeg/.png files are read" if other else ""
        skip = ""
        if skip_bad_images:
            skip = " (--skip-bad-images leaves out unreadable images, not missing ones)"
        raise SkinclfError(
            f"{source}: {len(missing)} of the {len(image_ids)} MEL/NV images listed in {metadata.name} are "
            f"not under it (first: {missing[0]}{seen}); expected the .jpg/.png images of the download "
            f"inside SOURCE, every part of it unpacked{skip}"
        )
    return [index[i] for i in image_ids]


def group_copies(groups: np.ndarray, sources: list[Path]) -> np.ndarray:
    """``groups`` (one per image) with the groups of byte-identical files joined: the same photo
    filed under two ids, as ISIC's archive has, would otherwise land in two splits, and a model
    would be tested on an image it trained on. Only files that share their size with another are
    read (and hashed); one that cannot be read stays apart (the writing reports it). The copies
    are counted on stderr, the first pair named."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for row, path in enumerate(sources):
        try:
            by_size[path.stat().st_size].append(row)
        except OSError:  # a dangling link: the writing names it (or --skip-bad-images skips it)
            continue
    by_size.pop(0, None)  # empty files are no photos (the writing reports them), nor copies of one
    rows = [row for same_size in by_size.values() if len(same_size) > 1 for row in same_size]
    with ThreadPoolExecutor(_WORKERS) as pool:
        digests = pool.map(lambda row: _file_digest(sources[row]), rows)
        by_digest: dict[str, list[int]] = defaultdict(list)
        for row, digest in zip(rows, digests, strict=True):
            if digest is not None:
                by_digest[digest].append(row)
    copies = [same for same in by_digest.values() if len(same) > 1]
    if not copies:
        return groups
    # Union-find over the group names: a copy may link two lesions, each with more images.
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while parent.get(group, group) != group:
            group = parent[group]
        return group

    for same in copies:
        for row in same[1:]:
            a, b = root(groups[same[0]]), root(groups[row])
            if a != b:
                parent[max(a, b)] = min(a, b)  # the same result whatever order the copies come in
    first = copies[0]
    print(
        f"{counted(sum(len(same) - 1 for same in copies), 'image')} of the download repeat another's file "
        f"byte for byte under another id (first: {sources[first[1]]} = {sources[first[0]]}): each kept "
        "in one split with its copies",
        file=sys.stderr,
    )
    return np.array([root(group) for group in groups], dtype=object)


def _file_digest(path: Path) -> str | None:
    """SHA-256 of the file's bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def assign_splits(labels: np.ndarray, groups: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """A split index (0 train, 1 val, 2 test) per image, stratified by label, never dividing a group.

    Per class, each split with a share first gets one group, then the other groups (lesions) go
    in seeded random order, each to the split furthest below its target share of that class's
    images: the proportions come out within about one group of ``fractions``, and lesions of
    every size can land in every split. (Largest first would fit the
    proportions more tightly, but would hand every lesion of several images to train, the split
    furthest behind while they come: val and test would then hold another kind of lesion, and no
    seed would change that.) A group of mixed labels follows its majority label.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"label": labels, "group": groups})
    per_group = frame.groupby("group", sort=True)["label"].agg(size="size", label=lambda s: s.mode().max())
    split_of_group: dict[str, int] = {}
    for _, members in per_group.groupby("label", sort=True):
        sizes = members["size"].iloc[rng.permutation(len(members))]
        targets, counts = fractions * sizes.sum(), np.zeros(len(fractions))
        # First one lesion for each split with a share, the smallest shares first, the first lesion
        # that fits in the share (else the smallest): in a small dataset one large lesion dealt out
        # early would otherwise fill train and leave val without this class.
        for split in sorted(np.flatnonzero(fractions > 0), key=lambda s: targets[s]):
            if sizes.empty:
                break
            fitting = sizes[sizes <= targets[split]]
            group = fitting.index[0] if not fitting.empty else sizes.idxmin()
            split_of_group[group], counts[split] = int(split), counts[split] + sizes[group]
            sizes = sizes.drop(group)
        for group, size in sizes.items():
            split = int(np.argmax(targets - counts))
            split_of_group[group] = split
            counts[split] += size
    return frame["group"].map(split_of_group).to_numpy()


def _write_image(src: Path, dst: Path, fmt: str) -> None:
    image = Image.fromarray(decode_image(src, IMAGE_SIZE).permute(1, 2, 0).numpy())
    if fmt == "jpg":
        # 4:4:4: Pillow's default 4:2:0 halves the colour resolution, and a lesion's colours are
        # what tells MEL from NV (at 128x128, 64x64 colour samples; decoded pixels up to 30
        # levels off on the synthetic images, 21 without subsampling).
        image.save(dst, quality=95, subsampling=0)
    else:
        image.save(dst)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SkinclfError(f"{out}: already exists and is not an empty folder; expected a new output folder")


def _split_counts(
    manifest: pd.DataFrame, fractions: np.ndarray, source: Path, left_out: str = ""
) -> pd.DataFrame:
    """Images per split (rows) and class (columns); an error when a split with a share holds no
    image of a class (``left_out``: what was left out after the split, said in that error)."""
    counts = pd.crosstab(manifest["split"], manifest["label"]).reindex(
        index=[s for s, f in zip(SPLIT_NAMES, fractions, strict=True) if f > 0],
        columns=["MEL", "NV"],
        fill_value=0,
    )
    for split_name, row in counts.iterrows():
        for label, n in row.items():
            if n == 0:
                after = f" after leaving out {left_out}" if left_out else ""
                raise SkinclfError(
                    f"{source}: no {label} image left for the {split_name} split ({len(manifest)} MEL/NV "
                    f"images{after}); expected a larger dataset, another --split or another --seed"
                )
    return counts


def _rebalanced(manifest: pd.DataFrame, skipped: list[int], seed: int) -> list[int]:
    """The rows that --balance leaves out beside the ``skipped`` ones: per split, for each skipped
    image of one class beyond those of the other, one image of the other class, drawn with
    ``seed``; so the classes stay as many as they were, and every split keeps its balance."""
    rng = np.random.default_rng(seed)
    left = manifest.drop(index=skipped)
    dropped: list[int] = []
    for split_name, rows in manifest.loc[skipped].groupby("split", sort=True):
        excess = int((rows["label"] == "MEL").sum() - (rows["label"] == "NV").sum())
        other = "NV" if excess > 0 else "MEL"
        candidates = left.index[(left["split"] == split_name) & (left["label"] == other)]
        dropped += rng.choice(candidates, min(abs(excess), len(candidates)), replace=False).tolist()
    return sorted(dropped)


def prepare(
    source: Path,
    out: Path,
    fractions: np.ndarray,
    balance: bool,
    seed: int,
    fmt: str,
    skip_bad_images: bool = False,
) -> pd.DataFrame:
    """Build OUT from SOURCE (see the module docstring); returns the manifest. With
    ``skip_bad_images``, an image that cannot be read is left out (named on stderr) instead of
    stopping it; the others keep the splits they had with it."""
    if not source.is_dir():
        what = "is a file (an archive? unpack it first)" if source.is_file() else not_a_folder(source)
        raise SkinclfError(f"{source}: {what}; expected an unpacked ISIC 2019 or HAM10000 download")
    # Absolute and normalised, so that OUT "." or "x/.." still has a name and a parent folder
    # for the hidden temporary sibling.
    out = Path(os.path.abspath(out))
    if out.resolve().is_relative_to(source.resolve()):
        # Its 128x128 copies would be found as images of the download by the next prepare.
        raise SkinclfError(f"{out}: inside the download {source}; expected an output folder outside it")
    _check_out(out)
    name, metadata, records = read_records(source)
    records = _mel_nv_without_duplicates(records, metadata).sort_values("image_id", ignore_index=True)
    for label in ("MEL", "NV"):  # as read, before balancing or looking for the images
        if not (records["label"] == label).any():
            raise SkinclfError(f"{metadata}: no {label} image listed; expected a download with MEL and NV")
    # Every listed image looked for, also those --balance leaves out: a missing one means a
    # download unpacked in part, whichever images the seed happens to draw.
    sources = locate_images(source, records["image_id"], metadata, skip_bad_images)
    balanced = ""
    if balance:
        drawn = undersample_majority((records["label"] == "MEL").to_numpy(), seed)
        counts = records["label"].value_counts()
        if len(drawn) < len(records):
            balanced = (
                f" (--balance left out {len(records) - len(drawn)} of the {counts.max()} {counts.idxmax()})"
            )
        records, sources = records.iloc[drawn].reset_index(drop=True), [sources[i] for i in drawn]
    # Images without a lesion id are their own group; a file's copies under other ids join its.
    groups = records["lesion_id"].where(records["lesion_id"] != "", "image:" + records["image_id"])
    groups = group_copies(groups.to_numpy(), sources)
    split = assign_splits(records["label"].to_numpy(), groups, fractions, seed)
    manifest = pd.DataFrame(
        {
            "file": [
                f"{SPLIT_NAMES[s]}/{label}/{image_id}.{fmt}"
                for s, label, image_id in zip(split, records["label"], records["image_id"], strict=True)
            ],
            "label": records["label"],
            "split": [SPLIT_NAMES[s] for s in split],
            # Escaped where a folder's name is no UTF-8: data=folder reads manifest.csv as UTF-8.
            "source": [readable(p.relative_to(source).as_posix()) for p in sources],
            "lesion_id": records["lesion_id"],
        }
    )
    counts = _split_counts(manifest, fractions, source)

    # Everything is written into a hidden sibling and renamed into place only when complete; the
    # folders above OUT that this makes are removed again when it fails.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    created = missing_folders(out.parent)
    moved: list[Path] = []  # into an empty OUT that existed: taken out again if this fails
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # The folders first: an OUT that cannot be written fails now, not after minutes of decoding.
        for split_name, label in manifest[["split", "label"]].drop_duplicates().itertuples(index=False):
            (tmp / split_name / label).mkdir(parents=True, exist_ok=True)

        def write(job: tuple[Path, str]) -> str | None:
            """The image written; or, skipped, why it could not be read."""
            try:
                _write_image(job[0], tmp / job[1], fmt)
            except SkinclfError as err:
                if not skip_bad_images:
                    raise SkinclfError(f"{err} (--skip-bad-images leaves such files out)") from err
                return str(err)
            return None

        pool = ThreadPoolExecutor(_WORKERS)
        try:
            jobs = pool.map(write, zip(sources, manifest["file"], strict=True))
            problems = list(progress(jobs, total=len(manifest), desc=f"prepare {name}", unit="img"))
        finally:  # a bad image ends it now, not after the images queued behind it
            pool.shutdown(cancel_futures=True)
        skipped = [row for row, problem in enumerate(problems) if problem is not None]
        if skipped:
            for row in skipped:
                print(f"skipped: {problems[row]}", file=sys.stderr)
            balancing = _rebalanced(manifest, skipped, seed) if balance else []
            for row in balancing:
                (tmp / manifest.at[row, "file"]).unlink()
            if balancing:
                print(
                    f"--balance: {counted(len(balancing), 'image')} of the other class left out too, "
                    "one for each unreadable one in its split, so that MEL and NV stay as many",
                    file=sys.stderr,
                )
            manifest = manifest.drop(index=skipped + balancing).reset_index(drop=True)
            left_out = f"{len(skipped)} unreadable" + (
                f" and {len(balancing)} to keep --balance" if balancing else ""
            )
            counts = _split_counts(manifest, fractions, source, left_out)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        _check_out(out)  # still free after the minutes of writing
        if out.exists():
            # An empty OUT the user made, perhaps the folder they stand in (OUT "."): filled, not
            # replaced, so that it stays the folder their shell is in. manifest.csv last: a folder
            # that has it is complete.
            for entry in sorted(tmp.iterdir(), key=lambda entry: entry.name == "manifest.csv"):
                os.replace(entry, out / entry.name)
                moved.append(out / entry.name)
        else:
            os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:  # OUT was empty: as it was (what cannot go stays; the error is the first)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        remove_empty_folders(created)
        if isinstance(err, OSError):  # unreadable sources are SkinclfErrors already: this is the writing
            # The hidden temporary sibling is skinclf's, not the user's: name the folder it is in.
            where = (
                err.filename if err.filename and not str(err.filename).startswith(str(tmp)) else out.parent
            )
            raise SkinclfError(f"{out}: cannot write the output ({err.strerror}: {where})") from err
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # emptied into an OUT that existed
    counts["total"] = counts.sum(axis=1)
    left_out = f", {len(skipped)} unreadable left out (listed above)" if skipped else ""
    print(f"{name}: {len(manifest)} MEL/NV images{balanced} from {source} -> {out} (manifest.csv){left_out}")
    print(counts.rename_axis(index="split", columns=None).to_string())
    print(f"next: {train_command_for(out)}")
    return manifest


def train_command_for(root: Path) -> str:
    """``skinclf train data=folder data.root=ROOT`` as it can be pasted into a shell: a root with
    spaces or commas quoted for Hydra's grammar, then the whole override quoted for the shell."""
    return f"skinclf train data=folder {shlex.quote(f'data.root={override_value(str(root))}')}"


def main(args: list[str]) -> None:
    """Entry point of ``skinclf prepare SOURCE OUT [--balance] [--split 71,14,15] [--seed N]
    [--format jpg|png]``."""
    ns = prepare_parser().parse_args(args)
    prepare(
        Path(ns.source),
        Path(ns.out),
        parse_fractions(ns.split),
        ns.balance,
        ns.seed,
        ns.format,
        ns.skip_bad_images,
    )
