#!/usr/bin/env python
"""`noisystudent analyze`: run `python pipelines/analyze.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("analyze")
