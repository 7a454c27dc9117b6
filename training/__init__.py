"""Tools that made and measure the embedded default draft: teacher data, distillation, prompt families and the
pair's measurement suite. Not needed to run PEARL; run them from the repository root as
``python -m training.<module>`` (see training/README.md)."""
