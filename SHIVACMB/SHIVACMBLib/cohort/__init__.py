"""Cohorts: `shivacmb batch` on dask.distributed (resume, failures, cohort tables) and its report."""
