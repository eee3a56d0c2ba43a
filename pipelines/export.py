#!/usr/bin/env python
"""`noisystudent export`: run `python pipelines/export.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("export")
