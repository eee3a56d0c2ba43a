"""Turn a folder tree of images into webdataset shards (image bytes copied verbatim).

    python pipelines/make_shards.py SRC_DIR OUT_DIR [--shard-size N] [--no-shuffle] [--seed S]
                                    [--class-from-parent] [--prefix shard] [--overwrite]

Undecodable files are skipped and counted (see OUT_DIR/MANIFEST.json).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import noisystudent  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from noisystudent.data.prepare import folder_to_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", metavar="SRC_DIR", help="folder tree of images")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write <prefix>-000000.tar ... and MANIFEST.json")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default: 5000)")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted path order")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--class-from-parent", action="store_true",
                        help="add an evaluation-only eval.json with the parent folder name as class")
    parser.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing <prefix>-*.tar shards in OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        manifest = folder_to_shards(
            args.src_dir,
            args.out_dir,
            shard_size=args.shard_size,
            shuffle=args.shuffle,
            seed=args.seed,
            class_from_parent=args.class_from_parent,
            prefix=args.prefix,
            overwrite=args.overwrite,
            show_progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    skipped = manifest["skipped"]
    print(f"wrote {manifest['total_samples']} samples in {len(manifest['shards'])} shard(s) to {args.out_dir}")
    for shard in manifest["shards"]:
        print(f"  {shard['path']}: {shard['samples']}")
    if skipped["total"]:
        print(f"skipped {skipped['total']} file(s):")
        for reason, n in sorted(skipped["by_reason"].items()):
            print(f"  {reason}: {n}")
        for ex in skipped["examples"][:5]:
            print(f"    e.g. {ex['where']}")
    else:
        print("skipped 0 files")
    if "classes" in manifest:
        print("classes: " + ", ".join(f"{c}={n}" for c, n in manifest["classes"].items()))
    print(f"manifest: {Path(args.out_dir) / 'MANIFEST.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
