"""Paper tables: specs (experiments/*.yaml) -> sweeps -> run records -> aggregated tables and plots."""
