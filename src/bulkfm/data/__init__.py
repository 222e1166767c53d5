"""Data layer: messy expression files and clinical tables -> one validated AnnData.

Conventions every stage relies on:

- ``adata.X``: samples x genes, float32, TPM after :func:`bulkfm.data.build.build_dataset`.
- ``adata.var_names``: Ensembl gene ids without version; ``var["symbol"]``.
- ``adata.obs_names``: sample ids; ``obs`` has ``patient``, ``cohort``,
  ``sample_type`` and, when joined, ``survival_time``/``survival_event`` and
  ``mut_<GENE>`` columns.
- ``adata.layers["missing"]`` (optional, sparse bool): True where a gene was absent
  from a sample's source file. Later stages mask these instead of trusting the fill.
- ``adata.uns["bulkfm"]``: provenance and coverage reports (plain dicts).
"""
