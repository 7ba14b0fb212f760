"""What can be a file or folder name in the outputs (case ids, prefixes, attention map names): one rule for the data
layer, which refuses unusable case ids when a data set is read, and for the writers (``predictions.types``)."""

from __future__ import annotations

import re

#: Names the writers use in file and folder names (case ids, prefixes, attention map names): ASCII letters, digits,
#: ``. _ + -``, starting with a letter or digit, no "..". ``data.discovery.CASE_ID_PATTERN`` and
#: ``predictions.types.check_name`` use it.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: The longest such name, in characters (= bytes: ASCII). A file name holds at most 255 bytes, and the writers add a
#: staging prefix and suffix (``.CASE.partial-PID-HOST-TOKEN``, ``ownership.staging_name``) and file suffixes (``CASE_attention_cross.nii.gz``, then a
#: hidden ``.….partial`` while it is written): 128 leaves room for all of them.
MAX_NAME_LENGTH = 128


def name_length_problem(value: str, what: str) -> str | None:
    """Why ``value`` is too long to be part of the writers' file names (``MAX_NAME_LENGTH``), or None."""
    if len(value) <= MAX_NAME_LENGTH:
        return None
    return (f"{what} {value[:24] + '...'!r} is {len(value)} characters long; at most {MAX_NAME_LENGTH} fit in the "
            "output file names (a file name holds 255 bytes, and the writers add suffixes such as "
            "'_attention_cross.nii.gz' and a staging prefix); shorten it")
