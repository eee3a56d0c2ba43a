#!/usr/bin/env python
"""`noisystudent select-for-labeling`: run `python pipelines/select_for_labeling.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("select-for-labeling")
