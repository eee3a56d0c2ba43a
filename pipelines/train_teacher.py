#!/usr/bin/env python
"""`noisystudent teacher`: run `python pipelines/train_teacher.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("teacher")
