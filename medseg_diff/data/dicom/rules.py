"""Which series of a study is which modality: regular expressions on the SeriesDescription.

A :class:`SeriesRule` holds, per canonical modality (t1, t1ce, t2, flair), a list of regular expressions. A series
belongs to a modality when one of that modality's expressions is found (``re.search``, case-insensitive) in its
description, normalised first: upper case, ``_ - /`` and runs of spaces become one space ("t1_mprage" ->
"T1 MPRAGE"). A series that matches two modalities is ambiguous (the caller refuses it), so the expressions of the
default rule exclude each other: "T2 FLAIR" is FLAIR, not T2; "T1 POST GD", "T1 C+", "T1CE" are T1ce, not T1;
"T1 PRE GD" is T1.

A rule file (JSON or YAML) maps modality names to an expression or a list of them; modalities it leaves out keep
the default's expressions::

    {"t1ce": ["^AX T1 POST"], "flair": "^AX FLAIR"}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from medseg_diff.data.conventions import MODALITIES
from medseg_diff.errors import DataError

_T1 = r"(T1(?!\d)|MPRAGE|MP RAGE|BRAVO|SPGR|VIBE)"
_CONTRAST = r"(\bPOST\b|\+|\bGD\b|GAD|CONTRAST|\bCE\b|T1 ?CE\b|T1 ?C\b|ENHANC|\bW ?C\b|\bWITH C|\bKM\b)"
_NO_CONTRAST = r"(\bPRE\b|\bPRE ?(GD|GAD|CONTRAST|C)\b|NON ?CONTRAST|WITHOUT|\bW ?O\b|NATIVE?\b)"
_FLAIR = r"(FLAIR|DARK ?FLUID)"

#: The default expressions: the usual descriptions of GE, Siemens and Philips brain protocols and of BraTS exports.
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "t1": (rf"^(?=.*{_T1})(?!.*{_CONTRAST})", rf"^(?=.*{_T1})(?=.*{_NO_CONTRAST})"),
    "t1ce": (rf"^(?=.*{_T1})(?=.*{_CONTRAST})(?!.*{_NO_CONTRAST})",),
    "t2": (rf"^(?=.*T2(?!\d))(?!.*{_FLAIR})(?!.*T2 ?(\*|STAR|FFE|GRE))(?!.*{_T1})",),
    "flair": (rf"^(?=.*{_FLAIR})(?!.*{_T1})",),
}


def normalise_description(text: str) -> str:
    """``"t1_mprage  post-gd"`` -> ``"T1 MPRAGE POST GD"``: what the expressions are matched against."""
    return " ".join(re.sub(r"[_\-/]+", " ", str(text)).upper().split())


@dataclass(frozen=True)
class SeriesRule:
    """Regular expressions on the SeriesDescription, per modality (see the module's docstring)."""

    patterns: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    source: str = "default rule"  # where the rule came from, for messages

    def __post_init__(self) -> None:
        unknown = [m for m in self.patterns if m not in MODALITIES]
        if unknown:
            raise DataError(self.source, f"unknown modality {', '.join(map(repr, unknown))} in the series rule; "
                                         f"known: {', '.join(MODALITIES)}")
        for modality, expressions in self.patterns.items():
            for expression in expressions:
                try:
                    re.compile(expression)
                except re.error as err:
                    raise DataError(self.source, f"{modality}: invalid regular expression {expression!r} ({err})"
                                    ) from None

    @classmethod
    def default(cls) -> SeriesRule:
        """The rule that recognises the usual descriptions ("AX T1", "T1 POST GD", "AX T2", "T2 FLAIR", ...)."""
        return cls()

    @classmethod
    def from_file(cls, path: str | Path) -> SeriesRule:
        """A rule read from a JSON or YAML file ``{modality: expression or [expressions]}``; modalities the file
        leaves out keep the default's expressions."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(path, f"cannot read the series rule ({err.strerror or err})") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                from medseg_diff.safe_yaml import ConfigYAMLError, load_yaml

                try:
                    doc = load_yaml(text)  # a repeated modality or an alias bomb is refused, not kept or expanded
                except ConfigYAMLError as err:
                    raise DataError(path, f"{err.key}: {err.problem}" if err.key else err.problem) from None
            else:
                doc = json.loads(text)
        except DataError:
            raise
        except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
            raise DataError(path, f"not a readable series rule ({type(err).__name__}: {err})") from None
        if not isinstance(doc, dict):
            raise DataError(path, "a series rule maps modality names to regular expressions, e.g. "
                                  '{"t1ce": ["^AX T1 POST"]}')
        patterns = dict(DEFAULT_PATTERNS)
        for modality, value in doc.items():
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise DataError(path, f"{modality}: expected a regular expression or a list of them, got {value!r}")
            patterns[str(modality)] = tuple(values)
        return cls(patterns, source=str(path))

    def modalities_of(self, description: str) -> list[str]:
        """Every modality whose expressions match ``description`` (normally one; none for a localizer or a DWI)."""
        text = normalise_description(description)
        return [m for m in MODALITIES
                if any(re.search(p, text, re.IGNORECASE) for p in self.patterns.get(m, ()))]
