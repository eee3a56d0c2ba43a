#!/usr/bin/env python
"""`noisystudent student`: run `python pipelines/train_student.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("student")
