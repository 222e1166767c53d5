"""The AnnData contract: every key bulkfm reads or writes, defined once and imported.

Modelled on scvi-tools' ``REGISTRY_KEYS``: a stage that needs the survival time writes
``adata.obs[keys.SURVIVAL_TIME]``, never the string. Renaming a key here renames it
everywhere; the data layer (:mod:`bulkfm.data`) is the one writer of most of them.

- ``X``: samples x genes, float32 TPM.
- ``var_names``: Ensembl gene ids without version; ``var[SYMBOL]``.
- ``obs_names``: sample ids; ``obs`` has ``SAMPLE_ID``, ``PATIENT``, ``COHORT``,
  ``SAMPLE_TYPE``, ``STUDY`` and, when joined, ``SURVIVAL_TIME``/``SURVIVAL_EVENT`` and
  one ``MUTATION_PREFIX + gene`` column per driver gene.
- ``layers[MISSING]`` (optional, bool): True where a gene was absent from a sample's
  source; later stages mask these instead of trusting the fill.
- ``layers[COUNTS]`` (optional): raw counts kept for count-based models.
- ``layers[IMPUTED]`` (written by ``bulkfm impute``): True where a value was imputed.
- ``var[ABSENT_FROM_INPUT]`` (written by ``bulkfm impute``): True for model genes the
  input had no column for, appended with every value imputed.
- ``uns[UNS]``: provenance and coverage reports (plain, JSON-able).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = [
    "ABSENT_FROM_INPUT",
    "COHORT",
    "COUNTS",
    "IMPUTED",
    "MISSING",
    "MUTATION_PREFIX",
    "PATIENT",
    "SAMPLE_ID",
    "SAMPLE_TYPE",
    "STUDY",
    "SURVIVAL_EVENT",
    "SURVIVAL_TIME",
    "SYMBOL",
    "UNS",
    "mutation_column",
    "mutation_columns",
]

# obs
SAMPLE_ID: Final = "sample_id"
PATIENT: Final = "patient"
COHORT: Final = "cohort"
SAMPLE_TYPE: Final = "sample_type"
STUDY: Final = "study"
SURVIVAL_TIME: Final = "survival_time"
SURVIVAL_EVENT: Final = "survival_event"
MUTATION_PREFIX: Final = "mut_"

# var
SYMBOL: Final = "symbol"
ABSENT_FROM_INPUT: Final = "absent_from_input"

# layers
MISSING: Final = "missing"
COUNTS: Final = "counts"
IMPUTED: Final = "imputed"

# uns
UNS: Final = "bulkfm"


def mutation_column(gene: str) -> str:
    """The obs column holding ``gene``'s mutation status."""
    return f"{MUTATION_PREFIX}{gene}"


def mutation_columns(columns: Iterable[object]) -> list[str]:
    """Gene names of the mutation columns among ``columns`` (in their order)."""
    return [
        str(c).removeprefix(MUTATION_PREFIX) for c in columns if str(c).startswith(MUTATION_PREFIX)
    ]
