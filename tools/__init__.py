"""Build-time tools, never imported by the runtime packages: the shipped assets' builders
(``build_assets``, ``build_multi``), the README's generated tables (``readme_tables``) and the checks
of the cluster files (``cluster_check``, ``cluster_policy``)."""
