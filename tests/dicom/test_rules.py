"""``data.dicom.rules.SeriesRule``: the default rule on the usual SeriesDescriptions, rule files, bad rules."""

import json

import pytest

from medseg_diff.data.dicom import SeriesRule
from medseg_diff.errors import DataError

USUAL = {
    "AX T1": "t1", "T1 MPRAGE": "t1", "t1_mprage_sag": "t1", "SAG T1 SE": "t1", "T1 PRE GD": "t1", "T1W_SE": "t1",
    "MPRAGE": "t1", "Ax T1 FLAIR": "t1",
    "T1 POST GD": "t1ce", "T1CE": "t1ce", "T1 C+": "t1ce", "T1 GD": "t1ce", "T1+C": "t1ce", "t1c": "t1ce",
    "AX T1 POST": "t1ce", "T1 MPRAGE POST CONTRAST": "t1ce", "T1 3D GAD": "t1ce", "T1 KM": "t1ce",
    "SAG T1 POSTERIOR FOSSA": "t1",
    "AX T2": "t2", "T2W_TSE": "t2", "T2 TSE AX": "t2",
    "T2 FLAIR": "flair", "FLAIR": "flair", "AX FLAIR POST GD": "flair", "T2 TIRM DARK-FLUID": "flair",
}
NONE = ["3-PLANE LOC", "Localizer", "DWI", "ADC", "T2*", "SWI", ""]


@pytest.mark.parametrize("description,modality", sorted(USUAL.items()))
def test_default_rule_maps_the_usual_descriptions(description, modality):
    assert SeriesRule.default().modalities_of(description) == [modality]


@pytest.mark.parametrize("description", NONE)
def test_default_rule_ignores_other_series(description):
    assert SeriesRule.default().modalities_of(description) == []


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_rule_file_overrides_some_modalities(tmp_path, suffix):
    doc = {"t1ce": ["^AX T1 POST"], "flair": "^AX FLAIR$"}
    path = tmp_path / f"rule{suffix}"
    path.write_text(json.dumps(doc) if suffix == ".json" else "t1ce:\n  - ^AX T1 POST\nflair: ^AX FLAIR$\n")
    rule = SeriesRule.from_file(path)
    assert rule.source == str(path)
    assert rule.modalities_of("AX T1 POST") == ["t1ce"]
    assert rule.modalities_of("SAG T1 POST") == []  # the file's expressions replace the default's for t1ce
    assert rule.modalities_of("AX FLAIR") == ["flair"] and rule.modalities_of("T2 FLAIR") == []
    assert rule.modalities_of("AX T2") == ["t2"]  # left out of the file: the default


@pytest.mark.parametrize("text,problem", [
    ('{"t5": "T5"}', "unknown modality 't5'"),
    ('{"t1": "T1("}', "invalid regular expression"),
    ('{"t1": 3}', "expected a regular expression or a list"),
    ('["T1"]', "maps modality names to regular expressions"),
    ("{not json", "not a readable series rule"),
])
def test_bad_rule_files_are_named(tmp_path, text, problem):
    path = tmp_path / "rule.json"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as err:
        SeriesRule.from_file(path)
    assert str(path) in str(err.value)


def test_missing_rule_file(tmp_path):
    with pytest.raises(DataError, match="cannot read the series rule"):
        SeriesRule.from_file(tmp_path / "nope.yaml")


def test_predict_takes_a_series_rule_for_unusual_descriptions(tmp_path, capsys):
    """A site's own descriptions: the default rule refuses the study listing its series; ``--series-rule`` maps it
    (the records ``predict`` would segment); a bad rule file is refused by the CLI before any model is loaded."""
    from dicom_support import study_volumes
    from medseg_diff.cli import main
    from medseg_diff.dicom import write_phantom_study
    from medseg_diff.stages.predict import input_records

    site = {"t1": "SEQ A", "t1ce": "SEQ B", "t2": "SEQ C", "flair": "SEQ D"}
    folder = write_phantom_study(study_volumes(), tmp_path / "study", descriptions=site)
    with pytest.raises(DataError, match="SEQ A"):
        input_records(folder)
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({m: [f"^{d}$"] for m, d in site.items()}))
    _, [record] = input_records(folder, series_rule=SeriesRule.from_file(rule))
    assert record["dicom_study"] == str(folder) and len(record["image"]) == 4

    rule.write_text("{not json")
    assert main(["predict", "--checkpoint", "none.pt", "--input", str(folder), "--out", str(tmp_path / "o"),
                 "--series-rule", str(rule)]) == 2
    assert str(rule) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
