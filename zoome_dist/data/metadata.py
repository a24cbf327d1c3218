"""The 12-value metadata encoding of ZooME (age, sex, anatomic site).

Defined once here and written into every shard manifest, so that training, evaluation and
prediction decode a sample identically (``MetadataEncoding.from_dict(manifest["metadata_encoding"])``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SITE_VOCAB = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "torso",
    "palms/soles",
    "oral/genital",
    "unknown",
)
SEX_VOCAB = ("male", "female", "unknown")
# ISIC 2019 (and a few spellings seen in the wild) onto the ISIC 2020 vocabulary.
SITE_ALIASES = {
    "anterior torso": "torso",
    "posterior torso": "torso",
    "lateral torso": "torso",
    "head neck": "head/neck",
    "palms soles": "palms/soles",
    "oral genital": "oral/genital",
}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


@dataclass(frozen=True)
class MetadataEncoding:
    """Age/90 + age-missing flag, sex one-hot, site one-hot (docs/data.md, "Metadata encoding")."""

    version: int = 1
    age_scale: float = 90.0
    sex_vocab: tuple[str, ...] = SEX_VOCAB
    site_vocab: tuple[str, ...] = SITE_VOCAB
    site_aliases: dict[str, str] = field(default_factory=lambda: dict(SITE_ALIASES))

    @property
    def names(self) -> list[str]:
        return (["age", "age_missing"] + [f"sex={s}" for s in self.sex_vocab]
                + [f"site={s}" for s in self.site_vocab])

    @property
    def dim(self) -> int:
        return 2 + len(self.sex_vocab) + len(self.site_vocab)

    def canonical_site(self, site: Any) -> tuple[str, bool]:
        """Map a raw site string onto the vocabulary; returns (site, was_recognised)."""
        if _is_missing(site):
            return "unknown", True
        key = str(site).strip().lower()
        key = self.site_aliases.get(key, key)
        if key in self.site_vocab:
            return key, True
        return "unknown", False

    def canonical_sex(self, sex: Any) -> str:
        if _is_missing(sex):
            return "unknown"
        key = str(sex).strip().lower()
        return key if key in self.sex_vocab else "unknown"

    def encode(self, age: Any, sex: Any, site: Any) -> np.ndarray:
        """One float32 vector of length ``dim``; missing values go to the flag / ``unknown``."""
        vec = np.zeros(self.dim, dtype=np.float32)
        if _is_missing(age):
            vec[1] = 1.0
        else:
            vec[0] = float(age) / self.age_scale
        vec[2 + self.sex_vocab.index(self.canonical_sex(sex))] = 1.0
        site_name, _ = self.canonical_site(site)
        vec[2 + len(self.sex_vocab) + self.site_vocab.index(site_name)] = 1.0
        return vec

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sex_vocab"] = list(self.sex_vocab)
        d["site_vocab"] = list(self.site_vocab)
        d["names"] = self.names
        d["dim"] = self.dim
        d["dtype"] = "float32"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetadataEncoding":
        if d.get("version") != 1:
            raise ValueError(f"Unsupported metadata encoding version {d.get('version')!r}; "
                             "this zoome_dist reads version 1.")
        return cls(version=1, age_scale=float(d["age_scale"]), sex_vocab=tuple(d["sex_vocab"]),
                   site_vocab=tuple(d["site_vocab"]), site_aliases=dict(d["site_aliases"]))
