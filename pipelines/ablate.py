#!/usr/bin/env python
"""`noisystudent ablate`: run `python pipelines/ablate.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("ablate")
