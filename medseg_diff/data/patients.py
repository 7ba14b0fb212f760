"""Patients of a data set: who each case belongs to, splits that keep a patient's cases together, and the leak rule.

A patient may have several cases (a BraTS 2023+ id carries a timepoint: ``BraTS-GLI-00001-000``, ``-001``). Splits
are per patient, with scikit-learn ``GroupKFold`` semantics (``grouped_splits``): patients are shuffled with the
seed, whole patients are held out as the test subset, and the rest are dealt into folds, largest patients first,
each into the fold with the fewest cases. When every patient has one case this is the per-case split of earlier
versions, case for case.

``split_leaks``: a patient with cases in two subsets (train and test) or two folds. Unlabelled cases (prediction
only: never trained on, never scored) are not part of the rule.

A mapping file (``read_patient_map``; ``medseg-diff manifest --patients FILE``) says who is who when the case ids do
not: a CSV with a ``case_id,patient_id`` header, or a JSON object ``{case id: patient id}``, naming every case.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

from medseg_diff.data.names import SAFE_NAME, name_length_problem
from medseg_diff.errors import ManifestError

__all__ = ["grouped_splits", "patient_id_problem", "read_patient_map", "split_leaks"]

log = logging.getLogger(__name__)

#: At most this many ids are listed in a message.
_LIST_MAX = 5


def patient_id_problem(value: object) -> str | None:
    """Why ``value`` cannot be a patient id (the rule of case ids, ``data.names.SAFE_NAME``), or None."""
    if not isinstance(value, str) or not value:
        return f"patient id {value!r} is empty" if value == "" else f"patient id must be a string, got {value!r}"
    if not SAFE_NAME.match(value) or ".." in value:
        return (f"patient id {value!r} is not usable (ASCII letters, digits, . _ + - only, starting with a letter or "
                "digit; no spaces, accents or path separators)")
    return name_length_problem(value, "patient id")


def read_patient_map(path: str | Path, case_ids: Iterable[str]) -> dict[str, str]:
    """case id -> patient id for every one of ``case_ids``, read from ``path``: a CSV with a ``case_id,patient_id``
    header (other columns are ignored), or a ``.json`` object ``{case id: patient id}``.

    Refused with ``ManifestError`` naming the file and the line (CSV) or key (JSON): a file that cannot be read or
    parsed, a missing header column, a case listed twice, a case id the data set does not hold, an empty or unusable
    patient id (``patient_id_problem``), and a case of the data set the file does not list."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet export is no part of the header
    except FileNotFoundError:
        raise ManifestError(path, "patient mapping file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(path, f"patient mapping file cannot be read ({err})") from None
    rows = _json_rows(text, path) if path.suffix.lower() == ".json" else _csv_rows(text, path)
    return _checked_map(rows, list(case_ids), path)


def _json_rows(text: str, path: Path) -> list[tuple[str, object, object]]:
    """``(where, case id, patient id)`` of a JSON object's entries."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(path, f"not a readable JSON patient mapping ({err})") from None
    if not isinstance(doc, dict):
        raise ManifestError(path, f"a JSON patient mapping is an object {{case id: patient id}}, got "
                                  f"{'a list' if isinstance(doc, list) else json.dumps(doc)}")
    return [(f"key {json.dumps(key)}", key, value) for key, value in doc.items()]


def _csv_rows(text: str, path: Path) -> list[tuple[str, object, object]]:
    """``(where, case id, patient id)`` of a CSV's rows below its ``case_id,patient_id`` header."""
    try:
        lines = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text)), start=1)
                 if any(c.strip() for c in row)]
    except csv.Error as err:
        raise ManifestError(path, f"not a readable CSV patient mapping ({err})") from None
    if not lines:
        raise ManifestError(path, "the patient mapping is empty; expected a CSV with a case_id,patient_id header")
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in ("case_id", "patient_id") if c not in columns]
    if missing:
        raise ManifestError(path, f"line {header_line}: header {','.join(header)!r} lacks the column(s) "
                                  f"{', '.join(missing)}; expected a CSV with a case_id,patient_id header "
                                  "(or a .json object {case id: patient id})")
    case_col, patient_col = columns.index("case_id"), columns.index("patient_id")
    rows = []
    for n, row in lines[1:]:
        if len(row) <= max(case_col, patient_col):
            raise ManifestError(path, f"line {n}: {len(row)} field(s), expected case_id and patient_id "
                                      f"({','.join(row)!r})")
        rows.append((f"line {n}", row[case_col].strip(), row[patient_col].strip()))
    return rows


def _checked_map(rows: list[tuple[str, object, object]], case_ids: list[str], path: Path) -> dict[str, str]:
    """The mapping of ``rows`` when it names every case of ``case_ids`` once, with usable patient ids."""
    known = set(case_ids)
    by_lower = {c.lower(): c for c in case_ids}
    mapping: dict[str, str] = {}
    where_of: dict[str, str] = {}
    unknown: list[str] = []
    for where, case_id, patient in rows:
        if not isinstance(case_id, str) or not case_id:
            raise ManifestError(path, f"{where}: the case id is empty")
        if case_id in where_of:
            raise ManifestError(path, f"{where}: case {case_id} is listed twice (also {where_of[case_id]}); give "
                                      "each case one patient")
        where_of[case_id] = where
        problem = patient_id_problem(patient)
        if problem:
            raise ManifestError(path, f"{where}: case {case_id}: {problem}")
        if case_id not in known:
            near = by_lower.get(case_id.lower())
            unknown.append(f"{case_id!r} ({where}{f'; did you mean {near!r}?' if near else ''})")
            continue
        mapping[case_id] = patient
    if unknown:
        raise ManifestError(path, f"{len(unknown)} unknown case id(s) not in the data set: {_listed(unknown)}; "
                                  "case ids are the data set's (its folder names)")
    missing = [c for c in case_ids if c not in mapping]
    if missing:
        raise ManifestError(path, f"{len(missing)} case(s) of the data set have no patient: {_listed(missing)}; "
                                  "the mapping must list every case (a case that is its own patient: patient id = "
                                  "case id)")
    return mapping


def _listed(values: list[str]) -> str:
    shown = ", ".join(values[:_LIST_MAX])
    return shown + (f" and {len(values) - _LIST_MAX} more" if len(values) > _LIST_MAX else "")


def grouped_splits(cases: Iterable[tuple[str, str]], folds: int, test_fraction: float,
                   seed: int) -> dict[str, tuple[str, int | None]]:
    """case id -> ``(subset, fold)`` for the labelled ``cases`` (``(case id, patient id)`` pairs), whole patients
    together (scikit-learn ``GroupKFold`` semantics, shuffled with ``seed``).

    1. patients in the order of their first case id, shuffled with ``random.Random(seed)``;
    2. test: ``round(test_fraction · cases)`` cases held out as whole patients, in shuffled order, skipping a patient
       that would overshoot; when that leaves the test short, the one patient that brings it closest (an empty test
       subset that was asked for takes the closest patient even on a tie);
    3. folds: the other patients, largest first (ties in shuffled order), each into the fold with the fewest cases
       (the lowest such fold). ``folds`` < 2: no folds (fold None).

    With one case per patient, step 2 holds out the first cases of the shuffle and step 3 deals the rest round-robin:
    the per-case split of earlier versions, case for case.
    """
    members: dict[str, list[str]] = {}
    for case_id, patient in sorted(cases):
        members.setdefault(patient, []).append(case_id)
    order = sorted(members, key=lambda p: members[p][0])
    random.Random(seed).shuffle(order)
    n_cases = sum(len(m) for m in members.values())
    # 2. the test subset: whole patients
    n_test = int(round(test_fraction * n_cases))
    test, rest, taken = [], [], 0
    for patient in order:
        if taken + len(members[patient]) <= n_test:
            test.append(patient)
            taken += len(members[patient])
        else:
            rest.append(patient)
    if taken < n_test and len(rest) > 1:
        best = min(rest, key=lambda p: abs(taken + len(members[p]) - n_test))  # first such in shuffled order
        after, before = abs(taken + len(members[best]) - n_test), n_test - taken
        if after < before or (after == before and taken == 0):
            rest.remove(best)
            test.append(best)
    # 3. folds: largest patients first, each into the currently smallest fold
    split = {case_id: ("test", None) for patient in test for case_id in members[patient]}
    sizes = [0] * max(folds, 1)
    for patient in sorted(rest, key=lambda p: -len(members[p])):  # stable: shuffled order among equal sizes
        fold = min(range(len(sizes)), key=lambda k: sizes[k])
        sizes[fold] += len(members[patient])
        split.update({case_id: ("train", fold if folds >= 2 else None) for case_id in members[patient]})
    if folds >= 2 and rest and 0 in sizes:
        log.warning("%d of %d folds hold no case: %d training patient(s) for %d folds", sizes.count(0), folds,
                    len(rest), folds)
    return split


def split_leaks(cases: Iterable[tuple[str, str, str, int | None]]) -> list[tuple[str, str]]:
    """``(case id, problem)`` for every case whose patient has an earlier case in another subset or fold.

    ``cases``: ``(case id, patient id, subset, fold)`` in manifest order. Unlabelled cases are left out: they are
    predicted only, never trained on nor scored, so they cannot leak a patient from training into a score."""
    first: dict[str, tuple[str, str, int | None]] = {}
    found = []
    for case_id, patient, subset, fold in cases:
        if subset == "unlabelled":
            continue
        if patient not in first:
            first[patient] = (case_id, subset, fold)
            continue
        other, other_subset, other_fold = first[patient]
        if (subset, fold) == (other_subset, other_fold):
            continue
        what = "two subsets" if subset != other_subset else "two folds"
        found.append((case_id, f"patient {patient} is in {what}: case {other} ({_place(other_subset, other_fold)}) "
                               f"and case {case_id} ({_place(subset, fold)}); one patient's cases must share one "
                               "subset and fold, or a model is validated or tested on a patient it was trained on. "
                               "Rebuild the manifest (medseg-diff manifest keeps a patient's cases together) or move "
                               "them together"))
    return found


def _place(subset: str, fold: int | None) -> str:
    return f"{subset}, fold {fold}" if fold is not None else subset
