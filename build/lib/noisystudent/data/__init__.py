"""Data layer shared by every stage: labeled ImageFolders, webdataset shards, pseudo-labels."""
