#!/usr/bin/env python
"""`noisystudent make-shards`: run `python pipelines/make_shards.py --help` for its arguments."""

from noisystudent.cli import pipeline_script

if __name__ == "__main__":
    pipeline_script("make-shards")
