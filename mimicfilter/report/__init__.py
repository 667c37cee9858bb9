"""The ``report`` command: quality estimate, plots, contact sheets and one static HTML page (torch-free)."""
