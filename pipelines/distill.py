#!/usr/bin/env python
"""`noisystudent distill`: run `python pipelines/distill.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("distill")
