"""Build data/debian_sections: Debian package one-line descriptions labelled with the package's Section.

    apt-get update && python scripts/build_debian_dataset.py    # reads /var/lib/apt/lists, writes the dataset

Input is the first line of ``Description:`` from the bookworm ``main`` Packages list that apt keeps under
/var/lib/apt/lists (any compression apt uses); the label is the ``Section:`` (its last path part, so
``contrib/games`` would be ``games``). Only topical sections are used: the language-ecosystem ones (python, perl,
rust, ...) name the answer in the package, and libs/doc/oldlibs say nothing about the topic.

The steps, each deterministic given the same lists and ``--seed``:

1. drop transitional/dummy packages (their description names no topic);
2. normalise descriptions (lower case, single spaces); a description Debian files under two or more sections is
   dropped entirely, one filed under one section several times is kept once (the first package by name);
3. keep at most ``--per-source`` packages of one source per section, so template families (tesseract-ocr-*,
   dict-freedict-*) do not fill a class;
4. split by source package (``Source:`` without its version, else ``Package:``): each source goes, with every
   binary package it builds, to one of train/validation/test, drawn per section so each gets its share;
5. balance: every section gets the same number of rows in each split (the size of the smallest section, at most
   ``--per-class``), subsampled with the seed.

Also writes labels.json (label id -> section), provenance.json (release, its date, the list's SHA-256, the
settings) and README.md (provenance, licence, counts per class and split, how to rebuild).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import random
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

LISTS_DIR = Path("/var/lib/apt/lists")
OUT = Path(__file__).resolve().parents[1] / "data" / "debian_sections"
SECTIONS = ("admin", "database", "editors", "games", "graphics", "mail", "math", "net", "science", "sound", "text",
            "video")
# Sections whose name gives the answer away (a language ecosystem) or that are not topical.
EXCLUDED = frozenset({
    "python", "perl", "ruby", "javascript", "golang", "rust", "haskell", "ocaml", "java", "php", "gnu-r", "lisp",
    "cli-mono", "interpreters", "introspection", "libs", "libdevel", "doc", "oldlibs", "debug", "metapackages",
    "tasks", "localization", "misc", "utils",
})
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
NOT_TOPICAL = re.compile(r"\btransitional\b|\bdummy (transitional )?package\b", re.IGNORECASE)
SOURCE_VERSION = re.compile(r"\s*\(.*\)\s*$")


class BuildError(ValueError):
    """The apt lists or the options cannot give a dataset; the message names the file or option and what to do."""


@dataclass(frozen=True)
class Package:
    name: str
    source: str
    section: str
    text: str  # the one-line description, as Debian writes it

    @property
    def key(self) -> str:
        """The description, case and whitespace normalised: what counts as a duplicate."""
        return " ".join(self.text.lower().split())


# ---- reading the apt lists ---------------------------------------------------------------------------------
def packages_list(lists_dir: Path, suite: str, component: str, arch: str) -> Path:
    """The Packages list of ``suite/component/binary-arch`` that ``apt-get update`` left in ``lists_dir``."""
    found = sorted(lists_dir.glob(f"*_dists_{suite}_{component}_binary-{arch}_Packages*"))
    if not found:
        raise BuildError(f"{lists_dir}: no {suite}/{component} binary-{arch} Packages list; run apt-get update "
                         f"(with {suite} {component} in /etc/apt/sources.list.d) or pass --lists-dir/--arch")
    if len(found) > 1:
        raise BuildError(f"{lists_dir}: several {suite}/{component} binary-{arch} lists ({[p.name for p in found]}); "
                         f"pass --lists-dir a folder with one mirror")
    return found[0]


def read_list(path: Path) -> str:
    """The text of an apt list in any compression apt stores (none, gz, xz, lz4, zst)."""
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix in (".lz4", ".zst", ".bz2"):
        helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
        if not Path(helper).exists():
            raise BuildError(f"{path}: a {path.suffix} list and no apt-helper to read it; decompress it into a folder "
                             f"of its own and pass that folder as --lists-dir")
        return subprocess.run([helper, "cat-file", str(path)], check=True, capture_output=True).stdout.decode("utf-8")
    return path.read_text(encoding="utf-8")


def stanzas(text: str) -> list[dict[str, str]]:
    """The fields of each paragraph of a deb822 file; continuation lines are left out (only first lines are used)."""
    records = []
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        if "Package" in fields:
            records.append(fields)
    return records


def as_package(fields: dict[str, str]) -> Package:
    source = SOURCE_VERSION.sub("", fields.get("Source", "")) or fields["Package"]
    section = fields.get("Section", "").rsplit("/", 1)[-1]
    return Package(fields["Package"], source, section, fields.get("Description", ""))


def release_fields(packages_path: Path) -> dict[str, str]:
    """Origin, Codename, Version and Date of the (In)Release file beside the Packages list, and its file name."""
    mirror, rest = packages_path.name.split("_dists_", 1)
    suite = rest.split("_", 1)[0]
    for name in ("InRelease", "Release"):
        path = packages_path.parent / f"{mirror}_dists_{suite}_{name}"
        if path.exists():
            fields = {"file": path.name}
            for line in path.read_text(encoding="utf-8").splitlines():
                field, _, value = line.partition(":")
                if field in ("Origin", "Codename", "Version", "Date") and field not in fields:
                    fields[field] = value.strip()
            return fields
    raise BuildError(f"{packages_path.parent}: no InRelease or Release file for {mirror} {suite}; run apt-get update")


# ---- filtering, splitting, balancing -----------------------------------------------------------------------
def candidates(packages: list[Package], sections: tuple[str, ...], per_source: int) -> dict[str, list[Package]]:
    """The usable packages of each chosen section (steps 1-3 of the module docstring), sorted by name."""
    packages = sorted((p for p in packages if p.text and not NOT_TOPICAL.search(p.text)), key=lambda p: p.name)
    sections_of = defaultdict(set)
    for package in packages:
        sections_of[package.key].add(package.section)
    kept: dict[str, list[Package]] = {section: [] for section in sections}
    seen, per_source_count = set(), Counter()
    for package in packages:
        if package.section not in kept or len(sections_of[package.key]) > 1 or package.key in seen:
            continue
        seen.add(package.key)
        if per_source_count[package.source, package.section] < per_source:
            per_source_count[package.source, package.section] += 1
            kept[package.section].append(package)
    return kept


def assign_splits(kept: dict[str, list[Package]], seed: int) -> dict[str, str]:
    """Source -> split. Each source is drawn under the section holding most of its rows, in seeded order, into
    test, then validation, until each holds its share of that section; the rest go to train."""
    rows = Counter((p.source, p.section) for section in kept.values() for p in section)
    primary = {}
    for (source, section), count in sorted(rows.items()):
        if source not in primary or count > rows[source, primary[source]]:
            primary[source] = section
    split_of = {}
    for section in kept:
        sources = sorted(s for s, home in primary.items() if home == section)
        random.Random(f"{seed}:{section}").shuffle(sources)
        total, filled = sum(rows[s, section] for s in sources), Counter()
        for source in sources:
            split = next((name for name in ("test", "validation") if filled[name] < SPLITS[name] * total), "train")
            split_of[source] = split
            filled[split] += rows[source, section]
    return split_of


def split_sizes(per_class: int) -> dict[str, int]:
    """Rows of one class in each split for ``per_class`` rows in all."""
    held_out = {name: round(share * per_class) for name, share in SPLITS.items() if name != "train"}
    return {"train": per_class - sum(held_out.values())} | held_out


def balanced(kept: dict[str, list[Package]], split_of: dict[str, str], cap: int, seed: int) -> dict[str, list[Package]]:
    """Split -> rows: the same number of each section in each split, the largest that every section can give."""
    available = {(section, split): [p for p in rows if split_of[p.source] == split]
                 for section, rows in kept.items() for split in SPLITS}
    per_class = min([cap] + [len(rows) for rows in kept.values()])
    while per_class > 0 and any(len(available[section, split]) < size
                                for split, size in split_sizes(per_class).items() for section in kept):
        per_class -= 1
    if per_class < 10:
        raise BuildError(f"sections {sorted(kept)} leave {per_class} rows per class; choose larger sections")
    out: dict[str, list[Package]] = {split: [] for split in SPLITS}
    for split, size in split_sizes(per_class).items():
        for section in kept:
            out[split] += random.Random(f"{seed}:{section}:{split}").sample(available[section, split], size)
        random.Random(f"{seed}:{split}").shuffle(out[split])
    return out


# ---- writing ------------------------------------------------------------------------------------------------
def check(dataset: dict[str, list[Package]]) -> None:
    """The invariants the dataset promises: no source and no description in two splits, classes balanced."""
    splits_of_source, splits_of_text = defaultdict(set), defaultdict(set)
    for split, rows in dataset.items():
        for package in rows:
            splits_of_source[package.source].add(split)
            splits_of_text[package.key].add(split)
        assert len(set(Counter(p.section for p in rows).values())) == 1, f"{split} is not balanced"
    assert all(len(s) == 1 for s in splits_of_source.values()), "a source straddles splits"
    assert sum(map(len, dataset.values())) == len(splits_of_text), "a description occurs twice"


def record(package: Package, labels: dict[str, int]) -> str:
    fields = {"text": package.text, "label": labels[package.section], "section": package.section,
              "package": package.name, "source": package.source}
    return json.dumps(fields, ensure_ascii=False)


def counts_table(dataset: dict[str, list[Package]], sections: tuple[str, ...]) -> str:
    counts = {split: Counter(p.section for p in rows) for split, rows in dataset.items()}
    lines = ["| label | section | " + " | ".join(SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    for label, section in enumerate(sections):
        lines.append(f"| {label} | {section} | " + " | ".join(str(counts[s][section]) for s in SPLITS) + " |")
    lines.append("| | **all** | " + " | ".join(str(len(dataset[s])) for s in SPLITS) + " |")
    return "\n".join(lines)


def readme(dataset: dict[str, list[Package]], sections: tuple[str, ...], provenance: dict) -> str:
    release, arch = provenance["release"], provenance["arch"]
    example = record(dataset["train"][0], {section: label for label, section in enumerate(sections)})
    splits = ", ".join(f"{name} {share:.0%}" for name, share in provenance["splits"].items())
    return f"""# debian_sections: what a Debian package is for, from its one-line description

{len(sections)}-way text classification. Input: the one-line description of a package in Debian `main`;
label: the package's archive Section. Written by `scripts/build_debian_dataset.py`; do not edit by hand.

```
{example}
```

`label` is the class id of `labels.json`, `section` its name; `package` and `source` say where the row came from
(the source package is the unit of the split). The files load as `train.data.train` / `train.data.eval` of a
seq-cls config: `configs/debian_sections_lora.yaml` trains LoRA on MiniLM with them (test.jsonl stays unseen).

## Provenance

| | |
|---|---|
| release | Debian {release.get('Version', '?')} `{release.get('Codename', '?')}`, `main`, `binary-{arch}` |
| Release file | `{release.get('file')}` |
| Release date | **{release.get('Date', '?')}** |
| Packages list | `{provenance['packages_file']}` ({provenance['packages_read']} packages) |
| its SHA-256 | `{provenance['packages_sha256']}` (the file as apt stored it) |
| settings | seed {provenance['seed']}; at most {provenance['per_class']} rows per class and \
{provenance['per_source']} packages of one source per section; {splits} |

## How it was made

1. Input is the first line of `Description:`; the label is `Section:` (its last path part). Sections used:
   {', '.join(sections)}.
   The language-ecosystem sections (python, perl, rust, golang, haskell, ...) are left out because the package's
   ecosystem, not its topic, decides them; libs, libdevel, doc, oldlibs, utils, misc and the like because they
   are not topical.
2. Transitional and dummy packages are dropped (their description names no topic).
3. Descriptions are compared lower-cased with single spaces. One that Debian files under two or more sections (any
   section of `main`) is dropped entirely; one filed several times under one section is kept once.
4. At most {provenance['per_source']} packages of one source per section, so that template families (tesseract-ocr-*,
   dict-freedict-*) do not fill a class.
5. The split is by source package (`Source:` without its version; `Package:` when absent): a source and every
   binary package it builds (its -data, -doc, -dev siblings) sit in one split. Sources are drawn per section, in
   seeded order, into test and validation until each holds its share, the rest into train.
6. Every class has the same number of rows in each split (the most that the smallest class can give, at most
   {provenance['per_class']}), subsampled with the seed. Usable rows per section before this step:
   {', '.join(f"{s} {n}" for s, n in provenance['usable_per_section'].items())}.

## Counts

{counts_table(dataset, sections)}

## Licence

The descriptions are part of the Debian archive metadata (the Packages indices), which Debian publishes for anyone
to mirror and redistribute; each package itself is under its own licence, named in its copyright file, and none
of the packages' contents is included here.

## Rebuild

```
apt-get update                                  # as root; needs bookworm main in the apt sources
python scripts/build_debian_dataset.py          # --lists-dir, --arch, --sections, --seed, --out: see --help
```

Given the same Packages list (same SHA-256 as above) the output is byte-identical; a newer list (a later point
release) gives a slightly different dataset, and provenance.json then records the new date and hash.
"""


def write(dataset: dict[str, list[Package]], sections: tuple[str, ...], provenance: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    labels = {section: label for label, section in enumerate(sections)}
    for split, rows in dataset.items():
        (out / f"{split}.jsonl").write_text("".join(record(p, labels) + "\n" for p in rows), encoding="utf-8")
    (out / "labels.json").write_text(json.dumps({str(i): s for s, i in labels.items()}, indent=2) + "\n")
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(readme(dataset, sections, provenance), encoding="utf-8")


# ---- the command --------------------------------------------------------------------------------------------
def build(packages_path: Path, sections: tuple[str, ...], arch: str, seed: int = 0, per_class: int = 600,
          per_source: int = 3) -> tuple[dict[str, list[Package]], dict]:
    """The dataset (split -> rows) and its provenance, from one Packages list."""
    excluded = sorted(set(sections) & EXCLUDED)
    if excluded:
        raise BuildError(f"--sections: {excluded} are not topical or name the answer; choose from e.g. {SECTIONS}")
    if len(set(sections)) != len(sections):
        raise BuildError(f"--sections: {list(sections)} names a section twice")
    packages = [as_package(fields) for fields in stanzas(read_list(packages_path))]
    kept = candidates(packages, sections, per_source)
    dataset = balanced(kept, assign_splits(kept, seed), per_class, seed)
    check(dataset)
    provenance = {
        "release": release_fields(packages_path), "arch": arch, "packages_file": packages_path.name,
        "packages_sha256": hashlib.sha256(packages_path.read_bytes()).hexdigest(), "packages_read": len(packages),
        "sections": list(sections), "seed": seed, "per_class": per_class, "per_source": per_source, "splits": SPLITS,
        "usable_per_section": {section: len(rows) for section, rows in kept.items()},
    }
    return dataset, provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lists-dir", type=Path, default=LISTS_DIR, help="where apt-get update left its lists")
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--component", default="main")
    parser.add_argument("--arch", default="amd64")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated; one class each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=600, help="cap on rows per class (all splits)")
    parser.add_argument("--per-source", type=int, default=3, help="cap on packages of one source per section")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sections = tuple(sorted(s.strip() for s in args.sections.split(",") if s.strip()))
    try:
        packages_path = packages_list(args.lists_dir, args.suite, args.component, args.arch)
        dataset, provenance = build(packages_path, sections, args.arch, args.seed, args.per_class, args.per_source)
    except BuildError as error:
        sys.exit(f"build_debian_dataset: {error}")
    write(dataset, sections, provenance, args.out)
    print(f"{provenance['release'].get('Codename')} {provenance['release'].get('Version')} "
          f"({provenance['release'].get('Date')}), {provenance['packages_read']} packages -> {args.out}")
    print(counts_table(dataset, sections))


if __name__ == "__main__":
    main()
