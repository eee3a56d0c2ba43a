#!/usr/bin/env python
"""`noisystudent prepare`: run `python pipelines/prepare.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("prepare")
