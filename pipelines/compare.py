#!/usr/bin/env python
"""`noisystudent compare`: run `python pipelines/compare.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("compare")
