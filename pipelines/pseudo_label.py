#!/usr/bin/env python
"""`noisystudent pseudo-label`: run `python pipelines/pseudo_label.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("pseudo-label")
