#!/usr/bin/env python
"""`noisystudent iterate`: run `python pipelines/iterate.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("iterate")
