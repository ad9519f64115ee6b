"""The experiment grid: methods x seeds x models as real federations (run_grid), and their report (report)."""
