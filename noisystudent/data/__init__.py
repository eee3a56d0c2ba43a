"""The data layer (layer 2): webdataset tar shards (``shard_io``), labeled ImageFolders
(``imagefolder``), epoch sampling (``sampler``), the pseudo-label schema and index
(``label_index``), read-time selection (``selection``), the student's stream (``pseudo_stream``),
the public label reader (``pseudo_labels``) and the hidden-tag audit (``audit``)."""
