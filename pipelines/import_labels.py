#!/usr/bin/env python
"""`noisystudent import-labels`: run `python pipelines/import_labels.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("import-labels")
